"""OFA-OCR (spec §10.2): ocr_resize, text normalisation and truncation, examples with the Chinese prompt and the
BERT tokenizer, accuracy / NED, the `ocr` TSV format, and the rendered sample lines."""

import base64
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ofa_scale.cli.preprocess import main as preprocess_main
from ofa_scale.data.sample_ocr import CHARSET, find_cjk_font, write_ocr_corpus
from ofa_scale.data.tokenizer import load_tokenizer
from ofa_scale.data.tsv_formats import get_format
from ofa_scale.errors import ConfigError, UserError
from ofa_scale.finetune.config import TaskSection
from ofa_scale.finetune.ocr import levenshtein, ocr_resize, ocr_scores
from ofa_scale.finetune.task import make_task


def cjk_font_or_skip():
    """The rendered lines need a CJK font (Debian fonts-wqy-microhei, which .ci/run installs through
    scripts/install_system_packages.sh); skip, saying so, where the machine has none."""
    try:
        return find_cjk_font()
    except UserError as e:
        pytest.skip(f"no CJK font on this machine: {e}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cjk_font_or_skip()
    return write_ocr_corpus(tmp_path_factory.mktemp("ocr"), images=6, eval_images=3, seed=1)


@pytest.fixture(scope="module")
def bert(corpus):
    return load_tokenizer("bert", corpus["ocr_vocab/vocab.txt"].parent)


@pytest.fixture(scope="module")
def gpt2(bpe_dir):
    return load_tokenizer("gpt2-bpe", bpe_dir)


def task_of(tok, **kw):
    cfg = TaskSection(name="ocr", language=kw.pop("language", "en"), image_size=kw.pop("image_size", 128),
                      max_tgt_length=kw.pop("max_tgt_length", 30), **kw)
    cfg.validate()
    return make_task(cfg, tok)


def gradient_image(w, h):
    """Every pixel distinct enough that a wrong crop, offset or stacking shows."""
    x = np.arange(w)[None, :, None] * 255 // max(w - 1, 1)
    y = np.arange(h)[:, None, None] * 255 // max(h - 1, 1)
    return Image.fromarray(np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                                           np.full((h, w, 1), 77)], -1).astype(np.uint8))


@pytest.mark.parametrize("w,h,size", [(200, 50, 128), (300, 20, 96), (40, 160, 128), (100, 100, 64)])
def test_ocr_resize_fits_keeps_aspect_and_edge_pads_at_a_random_offset(w, h, size):
    img = gradient_image(w, h)
    out = np.asarray(ocr_resize(img, size, random.Random(5)))
    assert out.shape == (size, size, 3)
    landscape = w >= h
    short = max(64, int(size * (min(w, h) / max(w, h))))
    new_w, new_h = (size, short) if landscape else (short, size)
    offset = random.Random(5).randint(0, size - short)  # the same draw as OFA's random.randint
    want = np.asarray(img.resize((new_w, new_h), Image.Resampling.BICUBIC))
    if landscape:
        assert np.array_equal(out[offset:offset + new_h], want)
        assert (out[:offset] == want[:1]).all() and (out[offset + new_h:] == want[-1:]).all()  # edge rows
    else:
        assert np.array_equal(out[:, offset:offset + new_w], want)
        assert (out[:, :offset] == want[:, :1]).all() and (out[:, offset + new_w:] == want[:, -1:]).all()


def test_ocr_resize_document_stacks_four_pieces_of_480():
    img = gradient_image(400, 40)
    out = np.asarray(ocr_resize(img, 480, random.Random(2), is_document=True))
    line = np.asarray(img.resize((1920, 64), Image.Resampling.BICUBIC))
    top = random.Random(2).randint(0, 480 - 256)
    for k in range(4):
        assert np.array_equal(out[top + 64 * k:top + 64 * (k + 1)], line[:, 480 * k:480 * (k + 1)])
    assert (out[:top] == line[:1, :480]).all() and (out[top + 256:] == line[-1:, 1440:]).all()


def test_text_is_normalised_lower_cased_and_truncated(bert, gpt2):
    zh = task_of(bert, max_tgt_length=4)  # the bert tokenizer: the Chinese branch
    assert zh.target_text("ＡＢ１２３４５") == "ab12"  # NFKC full-width → half-width, lower case, 4 characters
    # zhconv traditional → simplified before NFKC (OFA's order): 圖書館 → 图书馆, the full-width Ｘ → x
    assert task_of(bert, max_tgt_length=8).target_text("圖書館開門Ｘ") == "图书馆开门x"
    en = task_of(gpt2, language="en", max_tgt_length=2)
    assert en.target_text("  Red  Circle blue ") == "red circle"  # GPT-2 branch: first 2 words
    assert zh.lengths()[1] == 4 + 1 and en.lengths()[1] == 2 * 2 + 1


def test_examples_use_the_chinese_prompt_and_the_bert_target(bert, corpus):
    task = task_of(bert)
    rows = corpus["ocr_train.tsv"].read_text().splitlines()
    uid, image, text = rows[0].split("\t")
    record = {"meta": {"uniq_id": uid, "text": text}, "image": Image.open(io.BytesIO(base64.urlsafe_b64decode(image))),
              "seed": 11}
    (ex,) = task.train_examples(record)
    assert ex["source"] == [bert.bos, *bert.encode("图片上的文字是什么?"), bert.eos]
    assert bert.decode(ex["source"][1:-1]) == "图 片 上 的 文 字 是 什 么?"
    tgt = bert.encode(" " + text)
    assert len(tgt) == len(text)  # one WordPiece per character and digit of the sample lines
    assert ex["target"] == tgt + [bert.eos] and ex["prev_output"] == [bert.bos] + tgt
    assert ex["image"].shape == (3, 128, 128) and ex["image"].dtype == torch.uint8 and "constraint" not in ex
    # the record's seed places the line: the same seed, the same pixels; another seed moves it
    assert torch.equal(task.train_examples(record)[0]["image"], ex["image"])
    moved = [not torch.equal(task.train_examples({**record, "seed": s})[0]["image"], ex["image"]) for s in range(5)]
    assert any(moved)
    item = task.eval_item(record)
    assert item.reference == {"text": text} and item.decoder_prompt == [bert.bos]
    assert torch.equal(task.eval_item(record).image, item.image)  # evaluation placement is reproducible
    assert task.train_examples({**record, "meta": {"uniq_id": uid, "text": "  "}}) == []


def test_decoded_predictions_drop_spaces_and_score_accuracy_and_ned(bert):
    task = task_of(bert)
    ids = bert.encode(" 大东 4") + [bert.eos]
    assert task.decode_text(torch.tensor(ids)) == "大东4"
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("ab", "ab") == 0
    scores = ocr_scores(["大东4", "地9", "", "门"], ["大东4", "地9日", "", "口"])
    # exact: rows 0 and 2; distances 0, 1/3, 0 (both empty), 1
    assert scores["accuracy"] == pytest.approx(0.5)
    assert scores["ned"] == pytest.approx(1 - (0 + 1 / 3 + 0 + 1) / 4)
    items = [type("I", (), {"id": i, "reference": {"text": t}})() for i, t in enumerate(["大东4", "口"])]
    got = task.score([{"id": 0, "text": "大东4"}, {"id": 1, "text": "门"}], items)
    assert got == {"accuracy": 0.5, "ned": 0.5}
    assert task.result_entry({"id": 7, "text": "大东4"}) == {"image_id": 7, "ocr": "大东4"}


def test_config_errors(bert, gpt2):
    with pytest.raises(ConfigError, match="image_size >= 64"):
        task_of(bert, image_size=48)
    with pytest.raises(ConfigError, match="is_document"):
        task_of(bert, extra={"is_document": True})
    with pytest.raises(ConfigError, match="knows only is_document"):
        task_of(bert, extra={"document": True})
    with pytest.raises(ConfigError, match="kind=bert"):
        task_of(gpt2, language="zh")  # Chinese prompts need the BERT tokenizer


def test_the_tokenizer_picks_the_branch_as_in_ofa(bert, gpt2):
    """OFA's ocr_dataset chooses the prompt by the BPE's class: BERT → Chinese, GPT-2 → English."""
    assert task_of(bert)._prompt[1:-1] == bert.encode("图片上的文字是什么?")
    assert task_of(gpt2)._prompt[1:-1] == gpt2.encode(" what are the texts on the image?")


def test_sample_lines_parse_as_the_ocr_format_and_show_their_text(corpus, tmp_path):
    fmt = get_format("ocr")
    rows = corpus["ocr_train.tsv"].read_text().splitlines()
    assert len(rows) == 6 and len(corpus["ocr_test.tsv"].read_text().splitlines()) == 3
    for n, row in enumerate(rows):
        cols = row.split("\t")
        uid, fields = fmt.parse(cols, n)
        assert fields == {"text": cols[2]} and set(cols[2]) <= set(CHARSET) and 2 <= len(cols[2]) <= 8
        img = Image.open(io.BytesIO(base64.urlsafe_b64decode(cols[fmt.image_column])))
        assert img.width > img.height  # a horizontal line
    # deterministic, and ids of the held-out splits are disjoint from training
    again = write_ocr_corpus(tmp_path / "again", images=6, eval_images=3, seed=1)
    assert again["ocr_train.tsv"].read_bytes() == corpus["ocr_train.tsv"].read_bytes()
    test_ids = {r.split("\t")[0] for r in corpus["ocr_test.tsv"].read_text().splitlines()}
    assert not test_ids & {r.split("\t")[0] for r in rows}
    assert preprocess_main(["shards", "--format", "ocr", "--input", str(corpus["ocr_train.tsv"]), "--out",
                            str(tmp_path / "shards"), "--no-progress"]) == 0


def test_the_font_is_found_or_a_clear_error(tmp_path):
    assert cjk_font_or_skip().is_file()
    with pytest.raises(UserError, match="--ocr-font"):
        find_cjk_font(str(tmp_path / "missing.ttf"))


def test_the_sample_command_writes_the_ocr_lines_unless_told_not_to(tmp_path):
    cjk_font_or_skip()
    args = ["sample", "--rows", "1", "--finetune-images", "2", "--finetune-eval-images", "1"]
    assert preprocess_main([*args, "--out", str(tmp_path / "a")]) == 0
    written = tmp_path / "a" / "finetune"
    assert len((written / "ocr_train.tsv").read_text().splitlines()) == 2
    assert (written / "ocr_vocab" / "vocab.txt").is_file()
    assert preprocess_main([*args, "--out", str(tmp_path / "b"), "--ocr-font", "none"]) == 0
    assert not list((tmp_path / "b" / "finetune").glob("ocr_*"))


def test_without_a_cjk_font_the_sample_notes_it_and_writes_the_rest(tmp_path, monkeypatch, capsys):
    import ofa_scale.data.sample_ocr as sample_ocr

    monkeypatch.setattr(sample_ocr, "FONT_CANDIDATES", ())
    monkeypatch.setattr(sample_ocr.shutil, "which", lambda name: None)
    args = ["sample", "--rows", "1", "--finetune-images", "2", "--finetune-eval-images", "1"]
    assert preprocess_main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "OCR lines not written" in capsys.readouterr().out
    assert (tmp_path / "a" / "finetune" / "caption_test.tsv").is_file()
    assert not list((tmp_path / "a" / "finetune").glob("ocr_*"))
    # a font the user names must exist
    assert preprocess_main([*args, "--out", str(tmp_path / "b"), "--ocr-font", str(tmp_path / "none.ttf")]) != 0
