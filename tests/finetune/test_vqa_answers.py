"""`ofa-preprocess vqa-answers` and `load_answers`: the VQA candidate file (spec §6.3, issue 10 §6)."""

from __future__ import annotations

import pytest

from ofa_scale.cli.preprocess import main as preprocess_main
from ofa_scale.errors import UserError
from ofa_scale.finetune.answers import count_answers, load_answers


def row(qid: str, answers: str, question: str = "what is it?") -> str:
    # question-id, image-id, question, answers, objects, image base64 (never decoded by the counter)
    return "\t".join([qid, "img" + qid, question, answers, "dog&&cat", "aW1n"])


ROWS = [
    row("1", "1.0|!+yes"),
    row("2", "0.3|!+no&&1.0|!+yes"),        # target: yes (highest confidence)
    row("3", "1.0|!+no"),
    row("4", "0.6|!+two&&0.6|!+three"),     # tie: the first one, two
    row("5", "1.0|!+blue"),
    row("6", "1.0|!+no"),
    row("7", "1.0|!+red"),                  # red and blue: 1 each, tie broken alphabetically
    row("8", "1.0|!+yes"),
    "",                                      # blank line
    "only\tthree\tcolumns",                  # wrong column count
    row("9", "1.0 yes"),                     # no |!+ separator
    row("10", "abc|!+yes"),                  # confidence is not a number
]


@pytest.fixture
def tsv(tmp_path):
    path = tmp_path / "vqa_train.tsv"
    path.write_bytes(("\n".join(ROWS) + "\n").encode() + row("11", "1.0|!+caf\xe9").encode("latin-1") + b"\n")
    return path


def test_counts_training_targets_most_frequent_first_and_counts_bad_rows(tsv):
    counts = count_answers([tsv])
    assert counts.rows == 13
    assert dict(counts.counts) == {"yes": 3, "no": 2, "two": 1, "blue": 1, "red": 1}
    assert counts.ranked() == [("yes", 3), ("no", 2), ("blue", 1), ("red", 1), ("two", 1)]
    assert dict(counts.bad) == {"blank_line": 1, "wrong_column_count": 1, "bad_answers": 2, "bad_utf8": 1}
    assert counts.coverage(2) == pytest.approx(5 / 8)


def test_cli_writes_the_top_answers_atomically_and_reports(tsv, tmp_path, capsys):
    out = tmp_path / "answers.txt"
    assert preprocess_main(["vqa-answers", "--input", str(tsv), "--top", "3", "--out", str(out)]) == 0
    assert out.read_text() == "yes\nno\nblue\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.txt", "vqa_train.tsv"]  # no temp file left
    report = capsys.readouterr().out
    assert "13 rows read, 8 used, 5 bad" in report
    assert "bad_answers: 2" in report and "bad_utf8: 1" in report and "blank_line: 1" in report
    assert "wrote the 3 most frequent" in report and "75.00%" in report
    assert load_answers(out) == ["yes", "no", "blue"]


def test_default_top_keeps_every_answer_of_a_small_file(tsv, tmp_path):
    out = tmp_path / "all.txt"
    assert preprocess_main(["vqa-answers", "--input", str(tsv), "--out", str(out)]) == 0
    assert out.read_text().split("\n")[:-1] == ["yes", "no", "blue", "red", "two"]


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.tsv"
    assert preprocess_main(["vqa-answers", "--input", str(missing), "--out", str(tmp_path / "a.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.tsv"
    junk.write_text("a\tb\n\n")
    assert preprocess_main(["vqa-answers", "--input", str(junk), "--out", str(tmp_path / "a.txt")]) == 2
    err = capsys.readouterr().err
    assert "no readable VQA row" in err and "Traceback" not in err
    assert preprocess_main(["vqa-answers", "--input", str(junk), "--top", "0", "--out", str(tmp_path / "a")]) == 2
    assert not (tmp_path / "a.txt").exists()


def test_load_answers_rejects_missing_or_empty_files(tmp_path):
    with pytest.raises(UserError, match="task.answers is not set"):
        load_answers(None)
    with pytest.raises(UserError, match="does not exist"):
        load_answers(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match="holds no answer"):
        load_answers(empty)
    messy = tmp_path / "messy.txt"
    messy.write_text("yes\r\n no \n\nyes\nred and white\n")
    assert load_answers(messy) == ["yes", "no", "red and white"]
