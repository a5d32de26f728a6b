"""`ofa-demo` without a browser: the request bounds (file size, pixels, text length) and how every kind of bad
request, or a failing model, becomes one message line in the page instead of an exception; the options' checks;
the page's tabs, header and queue bounds."""

import io
import random
import socket

import pytest
from PIL import Image

from ofa_scale.demo.capabilities import CAPABILITIES
from ofa_scale.demo.cli import main
from ofa_scale.demo.limits import Limits, check_text, read_image
from ofa_scale.errors import UserError
from tests.demo.browser import SMALL_GEOMETRY

CAPS = {c.key: c for c in CAPABILITIES}


def png(path, size, colour=(30, 60, 200)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_read_image_bounds_and_messages(tmp_path):
    limits = Limits(max_image_bytes=4096, max_pixels=100 * 100)
    good = png(tmp_path / "good.png", (100, 100))
    assert Image.open(io.BytesIO(read_image(str(good), limits))).size == (100, 100)

    with pytest.raises(UserError, match="^upload an image first$"):
        read_image(None, limits)
    with pytest.raises(UserError, match="gone from the server"):
        read_image(str(tmp_path / "nowhere.png"), limits)
    big = tmp_path / "big.png"  # noise does not compress: 12 KiB
    Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3)).save(big)
    with pytest.raises(UserError, match=r"^the image is 1\d KiB; this demo takes images up to 4 KiB$"):
        read_image(str(big), limits)
    # a small file claiming many pixels is refused from its header, before decoding
    with pytest.raises(UserError, match="too large for this demo: 101x100"):
        read_image(str(png(tmp_path / "wide.png", (101, 100))), limits)
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(UserError, match="not an image this demo can read"):
        read_image(str(not_image), limits)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(UserError, match="not an image this demo can read"):
        read_image(str(truncated), limits)


def test_check_text_bounds():
    limits = Limits(max_text_chars=10)
    assert check_text("  what?  ", limits, what="question", required=True) == "what?"
    assert check_text(None, limits, what="text", required=False) == ""
    with pytest.raises(UserError, match="^type a question first$"):
        check_text("   ", limits, what="question", required=True)
    with pytest.raises(UserError, match="^the question has 11 characters; this demo takes up to 10$"):
        check_text("x" * 11, limits, what="question", required=True)


def test_limits_refuse_non_positive_values():
    with pytest.raises(UserError, match="--queue-size must be >= 1"):
        Limits(queue_size=0).validate()


@pytest.mark.parametrize("argv, message", [
    (["--port", "0"], "--port 0 is not a TCP port"),
    (["--max-text-chars", "0"], "--max-text-chars must be >= 1"),
    (["--answers", "/nowhere/answers.txt"], "--answers /nowhere/answers.txt does not exist"),
])
def test_bad_options_end_in_one_line(argv, message, capsys, tmp_path):
    assert main(["--model", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ofa-demo: error: ") and message in err and "\n" not in err


def test_missing_model_is_one_line(capsys, tmp_path):
    assert main(["--model", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def engine(demo_model_dir, bpe_dir):
    from ofa_scale.demo.engine import DemoModel

    overrides = tuple(v for v in SMALL_GEOMETRY if v != "--set")
    return DemoModel(str(demo_model_dir), tokenizer_path=str(bpe_dir), device="cpu", capabilities=CAPABILITIES,
                     limits=Limits(max_text_chars=40), overrides=overrides)


def test_handlers_answer_or_explain_never_raise(engine, tmp_path, monkeypatch):
    from ofa_scale.demo.app import respond

    photo = str(png(tmp_path / "photo.png", (90, 60)))
    caption, message = respond(engine, CAPS["caption"])({"path": photo})  # as gradio hands an upload over
    assert (bool(caption), message) in {(True, ""), (False, "The model's answer is empty.")}
    text, drawn, message = respond(engine, CAPS["grounding"])(photo, "the left half")
    assert text.startswith("box [x0, y0, x1, y1] in pixels: ") and message == ""
    assert drawn.size == (90, 60)  # the box is drawn on the original image

    assert respond(engine, CAPS["vqa"])(photo, "") == ("", "**Could not answer:** type a question first")
    assert respond(engine, CAPS["vqa"])(photo, "y" * 41) == (
        "", "**Could not answer:** the question has 41 characters; this demo takes up to 40")
    assert respond(engine, CAPS["grounding"])(None, "the dog") == ("", None, "**Could not answer:** upload an "
                                                                             "image first")

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.predictors["instruct"].task, "predict", broken)
    assert respond(engine, CAPS["instruct"])(photo, "describe it") == (
        "", "**Could not answer:** prediction failed: RuntimeError: device lost")
    # a bug outside the model call: one line on the page too (the traceback goes to the server's log)
    monkeypatch.setattr(engine, "answer", lambda *a: {}["missing"])
    assert respond(engine, CAPS["caption"])(photo) == ("", "**Prediction failed:** KeyError: 'missing'")


def test_page_has_one_tab_per_capability_and_bounded_queue(engine):
    from ofa_scale.demo.app import build_app

    app = build_app(engine, CAPABILITIES)
    ids = {block.elem_id for block in app.blocks.values() if getattr(block, "elem_id", None)}
    for cap in CAPABILITIES:
        assert {f"{cap.key}-tab", f"{cap.key}-image", f"{cap.key}-run", f"{cap.key}-output",
                f"{cap.key}-message"} <= ids
    assert ("grounding-box" in ids) and ("caption-text" not in ids) and ("vqa-text" in ids)
    assert app._queue.max_size == engine.limits.queue_size
    assert all(fn.concurrency_limit == engine.limits.concurrency for fn in app.fns.values())
    assert "ofa_tiny · 10.7M parameters (d_model 32, 1+1 layers) · cpu float32" in engine.title()


@pytest.mark.timeout(120)  # were the busy port not refused, launch() would serve until killed
def test_port_in_use_is_one_line(demo_model_dir, bpe_dir, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--model", str(demo_model_dir), "--tokenizer-path", str(bpe_dir), "--device", "cpu",
                     "--port", str(port)]) == 2
    assert f"ofa-demo: error: cannot listen on 127.0.0.1:{port}: the port is in use" in capsys.readouterr().err
