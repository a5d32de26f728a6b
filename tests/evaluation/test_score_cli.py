"""`ofa-eval score` end to end: JSONL in, results.parquet + eval.json out, one-line errors for bad input."""

import json

import pyarrow.parquet as pq
import pytest

from ofa_scale.cli.evaluate import main
from ofa_scale.evaluation.metrics.caption_text import prepare_caption
from ofa_scale.evaluation.metrics.cider import CiderD


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def run_score(tmp_path, task, preds, refs, *extra):
    out = tmp_path / f"out-{task}"
    rc = main(["score", "--task", task, "--predictions", write_jsonl(tmp_path / "p.jsonl", preds),
               "--references", write_jsonl(tmp_path / "r.jsonl", refs), "--out", str(out), *extra])
    return rc, out


def read_outputs(out):
    doc = json.loads((out / "eval.json").read_text())
    table = pq.read_table(out / "results.parquet")
    return doc, table


def test_caption_scores_and_tables(tmp_path, capsys):
    refs = [{"id": 1, "captions": ["A dog runs on the grass.", "a brown dog running"]},
            {"id": 2, "captions": "two people ride bikes&&people riding bicycles on a road"}]
    preds = [{"id": 2, "caption": "people riding bikes"}, {"id": 1, "caption": "a dog running on grass"}]
    rc, out = run_score(tmp_path, "caption", preds, refs)
    assert rc == 0
    doc, table = read_outputs(out)
    assert doc["format_version"] == 1 and doc["task"] == "caption" and doc["main_metric"] == "cider"
    assert doc["counts"] == {"samples": 2, "predictions": 2, "missing_predictions": 0}
    assert set(doc["metrics"]) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"}
    # rows follow reference order; per-sample CIDEr equals the metric on the prepared text
    assert table.column("id").to_pylist() == ["1", "2"]
    hyps = [prepare_caption("a dog running on grass"), prepare_caption("people riding bikes")]
    refs_tok = [[prepare_caption(c) for c in r] for r in (refs[0]["captions"], refs[1]["captions"].split("&&"))]
    expected = CiderD().score_per_hypothesis(hyps, refs_tok)
    assert table.column("cider").to_pylist() == pytest.approx(list(expected))
    assert doc["metrics"]["cider"] == pytest.approx(expected.mean())
    assert table.schema.metadata[b"format_version"] == b"1"
    assert "caption" in capsys.readouterr().out


def test_caption_ptb_and_meteor_through_java(tmp_path):
    refs = [{"id": "a", "captions": ["A man rides a horse.", "a person riding a horse"]},
            {"id": "b", "captions": ["A red car."]}]
    preds = [{"id": "a", "caption": "a man riding a horse"}, {"id": "b", "caption": "a blue truck"}]
    rc, out = run_score(tmp_path, "caption", preds, refs, "--caption-tokenizer", "ptb", "--meteor")
    assert rc == 0
    doc, table = read_outputs(out)
    assert doc["settings"]["caption_tokenizer"] == "ptb"
    meteor = table.column("meteor").to_pylist()
    assert meteor[0] > 0.5 and meteor[1] < meteor[0]
    assert 0 < doc["metrics"]["meteor"] < 1


def test_vqa_grounding_and_labels(tmp_path):
    rc, out = run_score(tmp_path, "vqa",
                        [{"id": 1, "answer": "two"}, {"id": 2, "answer": "red"}, {"id": 3, "answer": "no"}],
                        [{"id": 1, "answers": [{"answer": "two", "conf": 1.0}, {"answer": "2", "conf": 0.3}]},
                         {"id": 2, "answers": {"blue": 1.0}}, {"id": 3, "answers": {"no": 0.6}}])
    assert rc == 0 and read_outputs(out)[0]["metrics"]["vqa_score"] == pytest.approx((1.0 + 0 + 0.6) / 3)

    rc, out = run_score(tmp_path, "refcoco",
                        [{"id": 1, "box": [0, 0, 10, 10]}, {"id": 2, "bins": [0, 0, 999, 999]}],
                        [{"id": 1, "box": [1, 1, 10, 10]}, {"id": 2, "box": [0, 0, 100, 50], "width": 320,
                                                           "height": 200}])
    doc, table = read_outputs(out)
    assert rc == 0 and table.column("acc@0.5").to_pylist() == [1.0, 0.0]
    assert json.loads(table.column("prediction")[1].as_py()) == pytest.approx([0, 0, 320, 200])

    rc, out = run_score(tmp_path, "glue_cola",
                        [{"id": i, "label": p} for i, p in enumerate(["yes", "no", "yes", "no"])],
                        [{"id": i, "label": r} for i, r in enumerate([1, 0, 0, 0])])  # raw CoLA labels
    doc, _ = read_outputs(out)
    assert rc == 0 and doc["metrics"]["accuracy"] == 0.75 and doc["main_metric"] == "mcc"
    assert doc["metrics"]["mcc"] == pytest.approx((1 * 2 - 1 * 0) / (2 * 1 * 3 * 2) ** 0.5)

    rc, out = run_score(tmp_path, "snli_ve", [{"id": 1, "label": "maybe"}], [{"id": 1, "label": "neutral"}])
    assert rc == 0 and read_outputs(out)[0]["metrics"]["accuracy"] == 1.0


def test_gigaword(tmp_path):
    rc, out = run_score(tmp_path, "gigaword", [{"id": 1, "summary": "Police kill 1 man"}],
                        [{"id": 1, "summary": "police killed # men"}])
    doc, _ = read_outputs(out)
    assert rc == 0 and set(doc["metrics"]) == {"rouge1", "rouge2", "rouge_l"}
    assert 0 < doc["metrics"]["rouge1"] < 1


def test_missing_and_bad_input_are_one_line_errors(tmp_path, capsys):
    refs = [{"id": 1, "answers": {"a": 1.0}}, {"id": 2, "answers": {"b": 1.0}}]
    rc, _ = run_score(tmp_path, "vqa", [{"id": 1, "answer": "a"}], refs)
    err = capsys.readouterr().err
    assert rc == 2 and "--allow-missing" in err and len(err.strip().splitlines()) == 1

    rc, out = run_score(tmp_path, "vqa", [{"id": 1, "answer": "a"}], refs, "--allow-missing")
    doc, table = read_outputs(out)
    assert rc == 0 and doc["metrics"]["vqa_score"] == 0.5 and doc["counts"]["missing_predictions"] == 1
    assert table.column("missing_prediction").to_pylist() == [False, True]

    rc, _ = run_score(tmp_path, "vqa", [{"id": 1, "answer": "a"}, {"id": 1, "answer": "b"}], refs)
    assert rc == 2 and "more than once" in capsys.readouterr().err
    rc, _ = run_score(tmp_path, "vqa", [{"id": 1, "caption": "a"}, {"id": 2, "answer": "b"}], refs)
    assert rc == 2 and "'answer'" in capsys.readouterr().err
    rc, _ = run_score(tmp_path, "vqa", [{"id": 9, "answer": "a"}], refs)
    assert rc == 2 and "no reference" in capsys.readouterr().err
    (tmp_path / "broken.jsonl").write_text('{"id": 1}\nnot json\n')
    rc = main(["score", "--task", "vqa", "--predictions", str(tmp_path / "broken.jsonl"),
               "--references", write_jsonl(tmp_path / "r.jsonl", refs), "--out", str(tmp_path / "x")])
    assert rc == 2 and "broken.jsonl:2" in capsys.readouterr().err


def test_cider_df_cache_cli_feeds_scoring(tmp_path):
    refs = [{"id": i, "captions": [f"a dog number {i}", "a dog"]} for i in range(5)]
    df_path = tmp_path / "df.json.gz"
    assert main(["cider-df", "--references", write_jsonl(tmp_path / "train.jsonl", refs), "--out",
                 str(df_path)]) == 0
    preds = [{"id": i, "caption": "a dog"} for i in range(5)]
    rc, out = run_score(tmp_path, "caption", preds, refs, "--cider-df", str(df_path))
    doc, _ = read_outputs(out)
    assert rc == 0 and doc["settings"]["cider_document_frequencies"] == str(df_path)
    # same references, cache built from them: equal to the corpus-mode score
    rc, out2 = run_score(tmp_path, "caption", preds, refs)
    assert read_outputs(out2)[0]["metrics"]["cider"] == pytest.approx(doc["metrics"]["cider"])
