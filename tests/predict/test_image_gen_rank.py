"""CLIP reranking of text-to-image samples (`ofa-predict --task image_gen --clip`, the demo's `--clip`) with a tiny
random OFA model, VQGAN and CLIP: the order is the CLIP-similarity order of the very images written, the samples are
those of the log-probability run (only reordered), and exactly the listed PNGs plus a contact sheet are written."""

import json

import pytest
import torch
from PIL import Image

from ofa_scale.evaluation.clip_model import ClipScorer, clip_text, order_by
from ofa_scale.predict.cli import main
from tests.predict.test_image_gen import lines, model_dir, predict, vqgan_dir  # noqa: F401 - shared fixtures

CAPTION = "A red circle on a blue background"


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(ClipScorer.random("tiny", seed=5).model.state_dict(), path)
    return path


def test_cli_ranks_by_clip_and_writes_exactly_the_images(model_dir, bpe_dir, vqgan_dir, clip_file, tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"id": "c/1", "text": CAPTION}) + "\n" + json.dumps({"id": "bad", "text": " "})
                        + "\n")
    out = tmp_path / "gen.jsonl"
    assert predict(model_dir, bpe_dir, vqgan_dir, captions, out, "--samples", "3", "--seed", "7",
                   "--clip", str(clip_file), "--clip-arch", "tiny") == 1  # the blank caption fails
    got = lines(out)[0]
    assert got["id"] == "c/1" and len(got["images"]) == 3 and "error" in lines(out)[1]
    scorer = ClipScorer.load(clip_file, "tiny", device="cpu")
    written = [Image.open(p).convert("RGB") for p in got["images"]]
    sims = scorer.similarities(written, clip_text(CAPTION))  # recomputed on the PNGs, in the written order
    assert order_by(sims) == [0, 1, 2] and got["clip_scores"] == pytest.approx(sims.tolist(), abs=1e-5)
    image_dir = tmp_path / "gen_images"
    assert sorted(p.name for p in image_dir.iterdir()) == ["c_1_0.png", "c_1_1.png", "c_1_2.png"]
    with Image.open(tmp_path / "gen_contact_sheet.png") as sheet:
        assert sheet.format == "PNG"
    # the same seed without --clip: the same three samples, ranked by log-probability instead
    plain = tmp_path / "plain.jsonl"
    predict(model_dir, bpe_dir, vqgan_dir, captions, plain, "--samples", "3", "--seed", "7")
    base = lines(plain)[0]
    assert "clip_scores" not in base and base["logprobs"] == sorted(base["logprobs"], reverse=True)
    data = {json.dumps(lp): open(p, "rb").read() for lp, p in zip(base["logprobs"], base["images"])}
    assert sorted(got["logprobs"]) == sorted(base["logprobs"])
    assert all(open(p, "rb").read() == data[json.dumps(lp)] for lp, p in zip(got["logprobs"], got["images"]))


def test_generator_order_is_the_similarity_order(model_dir, bpe_dir, vqgan_dir):
    from ofa_scale.evaluation.model_source import load_eval_model
    from ofa_scale.predict.image_gen import ImageGenerator
    from ofa_scale.vqgan import load_vqgan, to_pil

    loaded = load_eval_model(str(model_dir), tokenizer_path=str(bpe_dir))
    scorer = ClipScorer.random("tiny", seed=9, device="cpu")
    gen = ImageGenerator(loaded.model.eval(), loaded.tokenizer, load_vqgan(vqgan_dir, device="cpu"), samples=4,
                         device=torch.device("cpu"), clip=scorer)
    samples, images = gen.generate(CAPTION, seed=3)
    by_logprob = gen.sample(CAPTION, seed=3)
    pictures = to_pil(gen.render(by_logprob))
    sims = scorer.similarities(pictures, clip_text(CAPTION))
    order = order_by(sims)
    assert [s.logprob for s in samples] == [by_logprob[i].logprob for i in order]
    assert [s.clip for s in samples] == pytest.approx([float(sims[i]) for i in order], abs=1e-6)
    assert all(a.tobytes() == pictures[i].tobytes() for a, i in zip(images, order))
    assert gen.labels(samples)[0].startswith("clip ")


def test_demo_text_to_image_with_clip(model_dir, bpe_dir, vqgan_dir, clip_file):
    from ofa_scale.demo.capabilities import TEXT_TO_IMAGE
    from ofa_scale.demo.engine import DemoModel
    from ofa_scale.demo.limits import Limits

    engine = DemoModel(str(model_dir), tokenizer_path=str(bpe_dir), device="cpu", capabilities=(TEXT_TO_IMAGE,),
                       limits=Limits(), vqgan=str(vqgan_dir), samples=2, clip=str(clip_file), clip_arch="tiny")
    answer = engine.answer(TEXT_TO_IMAGE, None, "a red circle")
    assert answer.text.startswith("CLIP similarity (best first): ") and len(answer.images) == 2
    scores = [float(x) for x in answer.text.split(": ")[1].split(", ")]
    assert scores == sorted(scores, reverse=True)


def test_clip_option_errors(model_dir, bpe_dir, vqgan_dir, tmp_path, capsys):
    from ofa_scale.demo.cli import main as demo_main

    (tmp_path / "c.txt").write_text("a cat\n")
    base = ["--model", str(model_dir), "--tokenizer-path", str(bpe_dir), "--input", str(tmp_path / "c.txt"),
            "--out", str(tmp_path / "o.jsonl"), "--device", "cpu"]
    assert main([*base, "--task", "caption", "--clip", "x.pt"]) == 2
    assert "--clip are image_gen options" in capsys.readouterr().err
    assert main([*base, "--task", "image_gen", "--vqgan", str(vqgan_dir), "--clip", str(tmp_path / "no.pt")]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert demo_main(["--model", str(model_dir), "--clip", "x.pt"]) == 2
    assert "needs --vqgan" in capsys.readouterr().err
