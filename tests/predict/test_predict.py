"""`ofa-predict` per task on a tiny random model: folder / TSV / JSONL inputs, one line per input in input order
with its id, error lines for bad inputs (the run goes on, exit 1), grounding boxes in original pixels and drawn."""

import json
from importlib.metadata import entry_points

import pytest
import torch
from PIL import Image

from ofa_scale.data.tokenizer import load_tokenizer
from ofa_scale.errors import UserError
from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model.checkpoint import save_pretrained
from ofa_scale.predict.cli import main
from ofa_scale.predict.tasks import RECIPES_DIR, SPECS, Predictor, task_section
from tests.finetune.tsv_shards import image_b64

SMALL = ["--set", "image_size=64", "--set", "box_normaliser=64", "--batch-size", "2"]


@pytest.fixture(scope="module")
def model_dir(bpe_dir, tmp_path_factory):
    torch.manual_seed(0)
    tok = load_tokenizer("gpt2-bpe", bpe_dir)
    model = OFAModel(OFAConfig.preset("ofa_tiny", vocab_size=len(tok), d_model=32, ffn_dim=64, heads=2,
                                      encoder_layers=1, decoder_layers=1)).eval()
    return save_pretrained(model, tmp_path_factory.mktemp("predict") / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for i, size in enumerate([(90, 60), (50, 120), (64, 64)]):
        Image.new("RGB", size, (40 * i, 120, 200)).save(root / f"img{i}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def predict(model_dir, bpe_dir, task, inp, out, *extra):
    return main(["--model", str(model_dir), "--tokenizer-path", str(bpe_dir), "--task", task, "--input", str(inp),
                 "--out", str(out), *SMALL, *extra])


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_caption_over_a_folder_reports_the_unreadable_image_and_keeps_the_rest(model_dir, bpe_dir, images,
                                                                              tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    assert predict(model_dir, bpe_dir, "caption", images, out) == 1
    got = lines(out)
    assert [g["id"] for g in got] == ["broken.jpg", "img0.png", "img1.png", "img2.png"]
    assert "unreadable image" in got[0]["error"] and "caption" not in got[0]
    assert all(isinstance(g["caption"], str) and "error" not in g for g in got[1:])
    assert "items/s" in capsys.readouterr().err


def test_vqa_jsonl_open_ended_and_with_candidates(model_dir, bpe_dir, images, tmp_path):
    jsonl = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "q1", "image": str(images / "img0.png"), "text": "what colour is it?"},
        {"id": 2, "image": str(images / "img1.png"), "text": "   "},            # empty question
        {"id": "q3", "image": "nowhere/missing.png", "text": "what is it?"},   # missing file
        {"image": str(images / "img2.png"), "text": "is it square?", "objects": ["box"]},  # id = file name
        "{not json",
    ])
    out = tmp_path / "open.jsonl"
    assert predict(model_dir, bpe_dir, "vqa", jsonl, out) == 1
    got = lines(out)
    assert [g["id"] for g in got] == ["q1", 2, "q3", "img2.png", "line 5"]
    assert got[1]["error"] == "empty question"
    assert "missing.png does not exist" in got[2]["error"]
    assert "not JSON" in got[4]["error"]
    assert isinstance(got[0]["answer"], str) and isinstance(got[3]["answer"], str)

    answers = tmp_path / "answers.txt"
    answers.write_text("zebra\nhot dog\nsurfing\n")
    out = tmp_path / "closed.jsonl"
    assert predict(model_dir, bpe_dir, "vqa", jsonl, out, "--answers", str(answers)) == 1
    got = lines(out)
    assert {got[0]["answer"], got[3]["answer"]} <= {"zebra", "hot dog", "surfing"}


def test_vqa_answers_switch_between_candidate_scoring_and_open_beam(bpe_dir):
    spec = SPECS["vqa"]
    open_ended = task_section(spec, run_task=None, recipe=None, answers=None, overrides=[], batch_size=4)
    assert (open_ended.decoding.inference, open_ended.answers, open_ended.constrained_training) == ("beam", None,
                                                                                                  False)
    closed = task_section(spec, run_task=None, recipe=None, answers="a.txt", overrides=[], batch_size=4)
    assert (closed.decoding.inference, closed.answers, closed.decoding.batch_size) == ("allcand", "a.txt", 4)


def test_grounding_tsv_boxes_in_original_pixels_and_drawn(model_dir, bpe_dir, tmp_path):
    sizes = {"r1": (120, 80), "r2": (70, 150)}
    rows = [[uid, "7", "the red half", "1,1,20,20", image_b64(*size)] for uid, size in sizes.items()]
    rows.append(["r3", "7", "", "1,1,20,20", image_b64(40, 40)])                 # empty expression
    rows.append(["r4", "7", "the left", "not a box", image_b64(40, 40)])         # reference box unused
    rows.append(["r5", "7", "the left", "1,1,2,2", "@@not base64@@"])            # bad image column
    tsv = tmp_path / "refcoco.tsv"
    tsv.write_text("".join("\t".join(r) + "\n" for r in rows))
    out, drawn = tmp_path / "boxes.jsonl", tmp_path / "drawn"
    assert predict(model_dir, bpe_dir, "grounding", tsv, out, "--draw-boxes", str(drawn)) == 1
    got = lines(out)
    assert [g["id"] for g in got] == ["r1", "r2", "r3", "r4", "r5"]
    assert "error" in got[2] and "error" in got[4] and "box" in got[3]
    for g, (w, h) in zip(got[:2], sizes.values()):
        x0, y0, x1, y1 = g["box"]
        assert 0 <= min(x0, x1) and max(x0, x1) <= w and 0 <= min(y0, y1) and max(y0, y1) <= h
        with Image.open(drawn / f"{g['id']}.png") as png:
            assert png.size == (w, h)
    assert not (drawn / "r3.png").exists()


def test_snli_ve_tsv_labels_and_bad_rows(model_dir, bpe_dir, tmp_path):
    rows = [["s1", "9", image_b64(60, 40), "a red square", "a square on a table", "entailment"],
            ["s2", "9", image_b64(60, 40), "a blue circle", "", "no label here"],   # label unused
            ["s3", "9", image_b64(60, 40), " ", "premise", "neutral"],            # empty hypothesis
            ["s4", "9", image_b64(60, 40)]]                                        # too few columns
    tsv = tmp_path / "snli.tsv"
    tsv.write_text("".join("\t".join(r) + "\n" for r in rows))
    out = tmp_path / "labels.jsonl"
    assert predict(model_dir, bpe_dir, "snli_ve", tsv, out) == 1
    got = lines(out)
    assert [g["id"] for g in got] == ["s1", "s2", "s3", "s4"]
    assert got[0]["label"] in {"yes", "no", "maybe"} and got[1]["label"] in {"yes", "no", "maybe"}
    assert "error" in got[2] and "columns" in got[3]["error"]


def test_instruct_puts_the_instruction_in_the_encoder_and_exits_0_when_all_succeed(model_dir, bpe_dir, images,
                                                                                    tmp_path):
    jsonl = write_jsonl(tmp_path / "i.jsonl", [{"id": "a", "image": str(images / "img0.png"),
                                                "text": "what does the image describe?"},
                                               {"id": "b", "image": str(images / "img1.png"),
                                                "text": "describe the colours"}])
    out = tmp_path / "text.jsonl"
    assert predict(model_dir, bpe_dir, "instruct", jsonl, out) == 0
    assert [(g["id"], isinstance(g["text"], str)) for g in lines(out)] == [("a", True), ("b", True)]

    tok = load_tokenizer("gpt2-bpe", bpe_dir)
    section = task_section(SPECS["instruct"], run_task=None, recipe=None, answers=None,
                           overrides=["image_size=64"], batch_size=1)
    item = Predictor(SPECS["instruct"], section, tok).item("a", Image.new("RGB", (30, 20)), "count the dogs", {})
    assert item.source == [tok.bos, *tok.encode(" count the dogs"), tok.eos] and item.decoder_prompt == [tok.bos]


@pytest.mark.parametrize("task", ["classify"])  # image_gen: tests/predict/test_image_gen.py
def test_tasks_without_a_recipe_are_refused_in_one_sentence(model_dir, bpe_dir, images, tmp_path, task, capsys):
    assert predict(model_dir, bpe_dir, task, images, tmp_path / "o.jsonl") == 2
    err = capsys.readouterr().err
    assert "not available yet: needs the ImageNet recipe" in err and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()


def test_console_script_is_registered():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("ofa-predict") == "ofa_scale.predict.cli:main"


def test_task_section_prefers_the_runs_own_section_for_its_task():
    spec = SPECS["caption"]
    run_task = {"name": "caption", "image_size": 96, "decoding": {"beam": 2}}
    own = task_section(spec, run_task=run_task, recipe=None, answers=None, overrides=["decoding.min_len=2"],
                       batch_size=3)
    assert (own.image_size, own.decoding.beam, own.decoding.min_len, own.decoding.batch_size) == (96, 2, 2, 3)
    other = task_section(spec, run_task={"name": "vqa", "image_size": 96}, recipe=None, answers=None,
                         overrides=[], batch_size=3)
    assert other.image_size == 480 and other.decoding.no_repeat_ngram_size == 3  # caption_stage1_base
    with pytest.raises(UserError, match="needs a caption recipe"):
        task_section(spec, run_task=None, recipe=str(RECIPES_DIR / "vqa_base.yaml"), answers=None, overrides=[],
                     batch_size=3)
