"""report.html: self-contained, opens in headless Chromium without console errors, shows curves and the confusion matrix."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import tiny_args
from tuneloop.cli import main


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        pytest.skip("no chromium on PATH (.ci/run installs Debian's chromium package)")
    return path


def screenshot(html, png, size="1200,2200") -> str:
    """Render a page headless; returns Chromium's log, where console messages appear as CONSOLE lines."""
    proc = subprocess.run([chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
                           "--hide-scrollbars", f"--window-size={size}", f"--screenshot={png}", html.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def page_console(log: str, page) -> list[str]:
    """Console lines Chromium logged for this page (its own start-up chatter has other sources)."""
    return [line for line in log.splitlines() if "CONSOLE" in line and (page.as_uri() in line or "Uncaught" in line)]


def colour_share(png, rgb, tolerance=12) -> float:
    import matplotlib.image

    pixels = (matplotlib.image.imread(png)[..., :3] * 255).astype(int)
    return float((np.abs(pixels - np.array(rgb)).max(-1) <= tolerance).mean())


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    from conftest import write_mrpc_head

    root = tmp_path_factory.mktemp("report")
    data = write_mrpc_head(root / "MRPC")
    out = root / "run"
    assert main(tiny_args(tiny_model_dir, data, out, "--epochs", "2", "--report-to", "none")) == 0
    return out


def test_report_of_a_run_renders_in_chromium(finished_run, tmp_path, capsys):
    assert main(["report", str(finished_run)]) == 0
    html_path = finished_run / "report.html"
    assert capsys.readouterr().out.strip() == f"wrote {html_path}"
    html = html_path.read_text()
    # Self-contained: every image is embedded, nothing is fetched, no script runs.
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in html and "http://" not in html and "https://" not in html
    predictions = [json.loads(line) for line in (finished_run / "predictions.jsonl").read_text().splitlines()[1:]]
    assert len(predictions) == 40
    matrix = np.zeros((2, 2), dtype=int)
    names = ["not_equivalent", "equivalent"]
    for p in predictions:
        matrix[names.index(p["label"]), names.index(p["prediction"])] += 1
    cells = re.search(r"true \\ predicted</th>.*?</table>", html, re.S).group(0)
    assert [int(c) for c in re.findall(r"<td>(\d+)</td>", cells)] == matrix.ravel().tolist()
    wrong = sorted((p for p in predictions if p["label"] != p["prediction"]), key=lambda p: -p["confidence"])
    assert f"The {min(20, len(wrong))} most confident mistakes" in html
    assert wrong and wrong[0]["text"].replace('"', "&#34;") in html

    png = tmp_path / "shot.png"
    log = screenshot(html_path, png)
    assert page_console(log, html_path) == []  # no console message from the page (errors, failed loads)
    # The pictures really render: the learning-rate curve's orange and the confusion matrix's dark blue.
    assert colour_share(png, (255, 127, 14)) > 2e-5  # 50+ pixels of the exact curve colour
    assert colour_share(png, (8, 48, 107)) > 1e-3


def test_console_errors_are_caught(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>undefined_function();</script></body></html>")
    (line,) = page_console(screenshot(page, tmp_path / "broken.png", "400,300"), page)
    assert "Uncaught ReferenceError: undefined_function is not defined" in line


def test_report_on_a_folder_without_a_run_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"tuneloop: error: report: {tmp_path} holds no run (expected config.yaml and metrics.jsonl, "
                   f"seeds_summary.json or trials.csv)")
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.strip() == f"tuneloop: error: report: {tmp_path / 'missing'} is not a folder"


def test_report_of_an_unfinished_run_with_a_torn_last_line(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "unfinished"
    shutil.copytree(finished_run, run)
    for name in ("eval_results.json", "run_summary.json"):
        (run / name).unlink()  # killed before the end: no results yet
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"type": "train", "step": 99, "lo')  # the line being written when the kill came
    (run / "predictions.jsonl").write_text("")  # an empty file, as a kill during a non-atomic write left
    assert main(["report", str(run)]) == 0, capsys.readouterr().err
    html = (run / "report.html").read_text()
    steps = [json.loads(l)["step"] for l in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert "learning curves" in html.lower() and max(steps) < 99


def test_predictions_come_from_the_last_evaluation_without_another_pass(tiny_model_dir, mrpc_slice, tmp_path, monkeypatch):
    import tuneloop.evaluate

    passes, real = [], tuneloop.evaluate.predict_batches

    def counted(*args, **kwargs):
        passes.append(1)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(tuneloop.evaluate, "predict_batches", counted)
    out = tmp_path / "run"
    assert main(tiny_args(tiny_model_dir, mrpc_slice, out, "--epochs", "2")) == 0
    assert len(passes) == 2  # the two epochs' evaluations; predictions.jsonl took the second one's rows
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()[1:]]
    dev = [line.split("\t")[0] for line in (mrpc_slice / "dev.tsv").read_text(encoding="utf-8-sig").splitlines()[1:]]
    names = ["not_equivalent", "equivalent"]
    assert sorted(r["index"] for r in rows) == list(range(40))
    assert all(names.index(r["label"]) == int(dev[r["index"]]) for r in rows)  # each row is its own example
    accuracy = sum(r["label"] == r["prediction"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(json.loads((out / "eval_results.json").read_text())["accuracy"])

    # A temperature folded in after the last evaluation changes every confidence: then one pass more.
    passes.clear()
    assert main(tiny_args(tiny_model_dir, mrpc_slice, tmp_path / "calibrated", "--epochs", "2", "--calibrate")) == 0
    assert len(passes) == 3
    calibrated = {r["index"]: r["confidence"] for r in (json.loads(line) for line in
                  (tmp_path / "calibrated" / "predictions.jsonl").read_text().splitlines()[1:])}
    assert calibrated != {r["index"]: r["confidence"] for r in rows}
