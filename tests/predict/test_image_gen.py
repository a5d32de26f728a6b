"""`ofa-predict --task image_gen` on a tiny random OFA model and a tiny random VQGAN: exactly 1024 code tokens per
sample (no special token among them), reproducible with a seed, PNGs of the VQGAN's output size, best-first order
equal to the model's log-probability order (checked by teacher-forced rescoring), and error lines for bad inputs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ofa_scale.data.tokenizer import load_tokenizer
from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model.checkpoint import save_pretrained
from ofa_scale.model.generate import NUM_SPECIAL, encode
from ofa_scale.predict.cli import main
from ofa_scale.predict.image_gen import NUM_CODES, ImageGenerator
from ofa_scale.vqgan import load_vqgan
from tests.vqgan.vqgan_helpers import SMALL_YAML, write_taming_dir

N_EMBED = SMALL_YAML["model"]["params"]["n_embed"]


@pytest.fixture(scope="module")
def model_dir(bpe_dir, tmp_path_factory):
    torch.manual_seed(0)
    tok = load_tokenizer("gpt2-bpe", bpe_dir)
    model = OFAModel(OFAConfig.preset("ofa_tiny", vocab_size=len(tok), d_model=32, ffn_dim=64, heads=2,
                                      encoder_layers=1, decoder_layers=1, code_image_size=256)).eval()
    return save_pretrained(model, tmp_path_factory.mktemp("image_gen") / "model")


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory):
    return write_taming_dir(tmp_path_factory.mktemp("vqgan") / "vqgan")


def predict(model_dir, bpe_dir, vqgan_dir, inp, out, *extra):
    return main(["--model", str(model_dir), "--tokenizer-path", str(bpe_dir), "--task", "image_gen",
                 "--vqgan", str(vqgan_dir), "--input", str(inp), "--out", str(out), "--device", "cpu", *extra])


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_cli_writes_ranked_pngs_and_error_lines(model_dir, bpe_dir, vqgan_dir, tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"id": "red", "text": "a red circle on a blue background"}) + "\n"
                        + json.dumps({"id": "blank", "text": "  "}) + "\n{not json\n")
    out = tmp_path / "gen.jsonl"
    assert predict(model_dir, bpe_dir, vqgan_dir, captions, out, "--samples", "2", "--seed", "7") == 1
    got = lines(out)
    assert [g["id"] for g in got] == ["red", "blank", "line 3"]
    assert got[1]["error"] == "empty caption" and "images" not in got[1]
    assert "not JSON" in got[2]["error"]
    first = got[0]
    assert len(first["images"]) == 2 and first["logprobs"] == sorted(first["logprobs"], reverse=True)
    for path in first["images"]:
        with Image.open(path) as im:  # 32×32 codes × the VQGAN's factor 8
            assert im.size == (256, 256) and im.mode == "RGB"
    # the same seed gives the same images, byte for byte
    again = tmp_path / "again.jsonl"
    predict(model_dir, bpe_dir, vqgan_dir, captions, again, "--samples", "2", "--seed", "7")
    assert lines(again)[0]["logprobs"] == first["logprobs"]
    assert all(open(a, "rb").read() == open(b, "rb").read()
               for a, b in zip(first["images"], lines(again)[0]["images"]))


def test_usage_errors_exit_2(model_dir, bpe_dir, vqgan_dir, tmp_path, capsys):
    captions = tmp_path / "c.txt"
    captions.write_text("a cat\n")
    assert main(["--model", str(model_dir), "--tokenizer-path", str(bpe_dir), "--task", "image_gen",
                 "--input", str(captions), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "needs --vqgan" in capsys.readouterr().err


@torch.no_grad()
def teacher_forced_logprob(model, batch, tokens, lo, hi):
    """log p(codes | caption) under generation's constraint: logits outside the code range ∪ specials masked
    before the softmax; computed in one parallel forward, independently of the incremental decoder."""
    prev = torch.cat([torch.zeros(1, 1, dtype=torch.long), tokens[None, :-1]], dim=1)
    logits = model.decoder(prev, encode(model, batch), code_masks=batch["code_masks"]).float()[0]
    allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
    allowed[:NUM_SPECIAL] = True
    allowed[lo:hi] = True
    lprobs = F.log_softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)
    return float(lprobs.gather(1, tokens[:, None]).sum())


def test_samples_are_exactly_1024_codes_ranked_by_logprob(model_dir, bpe_dir, vqgan_dir):
    from ofa_scale.evaluation.model_source import load_eval_model

    loaded = load_eval_model(str(model_dir), tokenizer_path=str(bpe_dir))
    model, tok = loaded.model.eval(), loaded.tokenizer
    gen = ImageGenerator(model, tok, load_vqgan(vqgan_dir, device="cpu"), samples=3, device=torch.device("cpu"))
    assert gen.cfg.constraint_range == (tok.code_offset, tok.code_offset + N_EMBED)  # the tokenizer's range
    samples = gen.sample("a green square", seed=3)
    assert len(samples) == 3
    assert [s.logprob for s in samples] == sorted((s.logprob for s in samples), reverse=True)
    batch = {"src_tokens": torch.tensor([gen.source("a green square")]),
             "code_masks": torch.ones(1, dtype=torch.bool)}
    for s in samples:
        assert s.codes.shape == (NUM_CODES,) and 0 <= int(s.codes.min()) and int(s.codes.max()) < N_EMBED
        tokens = s.codes + tok.code_offset
        assert all(tok.is_code(t) for t in tokens.tolist())  # no eos / special before the 1024th
        want = teacher_forced_logprob(model, batch, tokens, *gen.cfg.constraint_range)
        assert s.logprob == pytest.approx(want, rel=1e-4, abs=1e-3)
    assert len({tuple(s.codes.tolist()) for s in samples}) == 3  # sampled, not three copies of one decode
    assert tuple(gen.render(samples[:1]).shape) == (1, 256, 256, 3)


def test_demo_text_to_image_tab(model_dir, bpe_dir, vqgan_dir):
    from ofa_scale.demo.app import build_app, respond
    from ofa_scale.demo.capabilities import CAPABILITIES, TEXT_TO_IMAGE, capabilities
    from ofa_scale.demo.engine import DemoModel
    from ofa_scale.demo.limits import Limits

    assert capabilities(vqgan=False) == CAPABILITIES and capabilities(vqgan=True)[-1] == TEXT_TO_IMAGE
    engine = DemoModel(str(model_dir), tokenizer_path=str(bpe_dir), device="cpu", capabilities=(TEXT_TO_IMAGE,),
                       limits=Limits(), vqgan=str(vqgan_dir), samples=2)
    text, gallery, message = respond(engine, TEXT_TO_IMAGE)("a red circle")  # a text-only tab: no image input
    assert text.startswith("log-probabilities (best first): ") and message == ""
    assert [im.size for im in gallery] == [(256, 256), (256, 256)]
    assert respond(engine, TEXT_TO_IMAGE)("  ") == ("", None, "**Could not answer:** type a caption first")
    app = build_app(engine, (TEXT_TO_IMAGE,))
    ids = {block.elem_id for block in app.blocks.values() if getattr(block, "elem_id", None)}
    assert {"image_gen-text", "image_gen-run", "image_gen-gallery", "image_gen-message"} <= ids
    assert "image_gen-image" not in ids


def test_caption_inputs_txt_tsv_jsonl(tmp_path):
    from ofa_scale.errors import UserError
    from ofa_scale.predict.inputs import read_captions

    txt = tmp_path / "c.txt"
    txt.write_text("a red circle\n\n  \nTwo dogs\n")
    assert [(x.id, x.text) for x in read_captions(txt)] == [(1, "a red circle"), (4, "Two dogs")]  # blanks skipped
    tsv = tmp_path / "c.tsv"
    tsv.write_text("u1\t1 2 3\ta blue square\nu2\tonly two columns\n")
    got = list(read_captions(tsv))
    assert (got[0].id, got[0].text, got[0].error) == ("u1", "a blue square", None)
    assert got[1].id == "u2" and "the image_gen format 3" in got[1].error
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"caption": "a cat"}\n[1]\n')
    got = list(read_captions(jsonl))
    assert (got[0].id, got[0].text) == (1, "a cat") and "not a JSON object" in got[1].error
    with pytest.raises(UserError, match="reads captions from a .txt, .jsonl or .tsv"):
        next(read_captions(tmp_path))
