"""The command line as a user runs it: files written, pipeline round trip, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_args
from tuneloop.cli import main


@pytest.fixture
def trained(tiny_model_dir, mrpc_slice, tmp_path):
    """One real `python -m tuneloop train` run in a subprocess, shared by the checks below."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tuneloop", *tiny_args(tiny_model_dir, mrpc_slice, out, "--epochs", "2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    return out, mrpc_slice, proc


def test_train_eval_predict_and_pipeline_round_trip(trained, tmp_path, capsys):
    out, data_dir, proc = trained
    final = json.loads((out / "eval_results.json").read_text())
    assert json.loads(proc.stdout[proc.stdout.index("{"):]) == {k: v for k, v in final.items()
                                                                   if k not in ("step", "epoch", "main_metric", "best_metric",
                                                                                "best_step", "stopped_early")}
    assert "Traceback" not in proc.stderr

    # Re-evaluating the saved model reproduces the run's final metrics.
    assert main(["eval", "--model-dir", str(out / "model"), "--task", "mrpc", "--data-dir", str(data_dir),
                 "--mixed-precision", "no", "--output-dir", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    assert again["accuracy"] == final["accuracy"] and again["f1"] == pytest.approx(final["f1"])
    assert again["loss"] == pytest.approx(final["loss"], rel=1e-5)
    capsys.readouterr()

    # `tuneloop predict` and transformers.pipeline agree on labels and scores.
    rows = [{"text": "The cat sat on the mat .", "text_pair": "A cat was sitting on the mat ."},
            {"text": "Stocks fell sharply on Monday .", "text_pair": "He plays the violin ."}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["predict", "--model-dir", str(out / "model"), "--input", str(inp), "--output", str(tmp_path / "p.jsonl")]) == 0
    ours = [json.loads(l) for l in (tmp_path / "p.jsonl").read_text().splitlines()]
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(out / "model"))
    theirs = [pipe(r) for r in rows]
    theirs = [t[0] if isinstance(t, list) else t for t in theirs]
    assert [o["label"] for o in ours] == [t["label"] for t in theirs]
    assert [o["score"] for o in ours] == pytest.approx([t["score"] for t in theirs], abs=1e-5)
    assert {o["label"] for o in ours} <= {"equivalent", "not_equivalent"}

    # CSV on stdin works too.
    csv_text = "text,text_pair\n" + "\n".join(f'"{r["text"]}","{r["text_pair"]}"' for r in rows) + "\n"
    proc = subprocess.run([sys.executable, "-m", "tuneloop", "predict", "--model-dir", str(out / "model"),
                           "--input", "-"], input=csv_text, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(l)["label"] for l in proc.stdout.splitlines()] == [o["label"] for o in ours]


def test_data_command_shows_what_the_loop_sees(tiny_model_dir, mrpc_slice, capsys):
    assert main(["data", "--model", str(tiny_model_dir), "--data-dir", str(mrpc_slice)]) == 0
    text = capsys.readouterr().out
    assert "train" in text and "64 examples" in text and "validation" in text and "40 examples" in text
    assert "equivalent: " in text and "decoded: [CLS]" in text
    assert "input_ids (8," in text and "p50" in text and "padding share of a batch-size-8 epoch:" in text


def _one_line_error(capsys, code, argv, fragment):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code and len(err) == 1, err
    assert fragment in err[0] and "Traceback" not in err[0]


def test_bad_inputs_end_in_one_line(tiny_model_dir, mrpc_slice, tmp_path, capsys):
    m = str(tiny_model_dir)
    out = str(tmp_path / "o")
    good = tmp_path / "good.csv"
    good.write_text("text,label\nfine film,pos\nbad film,neg\n")
    _one_line_error(capsys, 1, ["train", "--model", m, "--train-file", str(tmp_path / "missing.csv"),
                                "--output-dir", out], "train file not found")
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("text\nx\n")
    _one_line_error(capsys, 1, ["train", "--model", m, "--train-file", str(nolabel), "--output-dir", out],
                    "missing label column")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    _one_line_error(capsys, 1, ["train", "--model", m, "--train-file", str(good),
                                "--validation-file", str(empty), "--output-dir", out], "validation split is empty")
    odd = tmp_path / "odd.csv"
    odd.write_text("text,label\nhmm,maybe\n")
    _one_line_error(capsys, 1, ["train", "--model", m, "--train-file", str(good),
                                "--validation-file", str(odd), "--output-dir", out], "label 'maybe' is not in the label set")
    _one_line_error(capsys, 1, ["train", "--model", str(tmp_path / "no-model"), "--data-dir", str(mrpc_slice),
                                "--output-dir", out], "model path does not exist")
    _one_line_error(capsys, 2, ["train", "--batch-size", "0"], "train.batch_size: must be at least 1")
    _one_line_error(capsys, 1, ["predict", "--model-dir", m, "--input", str(tmp_path / "nope.jsonl")], "input file not found")
    _one_line_error(capsys, 2, ["eval"], "eval needs --model-dir")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_failed_run_leaves_an_existing_run_untouched(trained, tiny_model_dir, capsys):
    out, data_dir, _ = trained
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _one_line_error(capsys, 1, tiny_args(tiny_model_dir, data_dir, out), "already holds a run")
    _one_line_error(capsys, 1, tiny_args(tiny_model_dir, data_dir / "missing", out, "--overwrite"),
                    "data directory not found")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="train file not found"):
        main(["train", "--train-file", str(tmp_path / "x.csv"), "--debug"])


def test_help_names_value_types_plainly(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--max-length INT" in text and "--learning-rate FLOAT" in text and "--max-train-samples INT | NONE" in text
    assert "<CLASS" not in text.upper()


def test_control_characters_in_flags_stay_on_the_error_line(capsys):
    """Found by tests/test_fuzz.py: a value with \\x1e (a line break to str.splitlines) split the error line."""
    assert main(["train", "--name", "\x1e", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("tuneloop: error: ") and "\\x1e" in err
