"""`tuneloop serve`: a real server in a subprocess on a free port, real HTTP, a real headless Chromium for the page."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, mrpc_dev_pairs
from tuneloop.predict import predict_rows

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

START_TIMEOUT = 240  # two shared cores: importing torch and transformers can take a minute


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m tuneloop serve ...` in a subprocess, its log in a file, ready once /health answers."""

    def __init__(self, model_dir: Path, log: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "tuneloop", "serve", "--model-dir", str(model_dir), "--port", str(self.port),
               "--no-access-log", *extra]
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"server not ready after {START_TIMEOUT} s: {log.read_text()[-3000:]}")

    def post(self, body, **kwargs):
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(f"{self.url}/predict", content=content, headers={"Content-Type": "application/json"},
                          timeout=60, **kwargs)

    def metadata(self) -> dict:
        return httpx.get(f"{self.url}/metadata", timeout=10).json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return mrpc_dev_pairs(24)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # A wait of 200 ms lets the concurrent requests below meet in one batch even on a loaded machine.
    srv = Server(tiny_model_dir, tmp_path_factory.mktemp("serve") / "server.log", "--max-wait-ms", "200",
                 "--max-inputs", "8", "--max-body-bytes", "20000")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()[-3000:]


def test_single_and_list_requests_agree_with_predict(server, tiny_model_dir, rows):
    expected = list(predict_rows(str(tiny_model_dir), rows))
    one = server.post({"text": rows.text[0], "text_pair": rows.text_pair[0]})
    assert one.status_code == 200
    assert one.json()["label"] == expected[0]["label"]
    assert one.json()["score"] == pytest.approx(expected[0]["score"], abs=1e-6)
    batch = server.post([{"text": a, "text_pair": b} for a, b in zip(rows.text[:8], rows.text_pair[:8])])
    assert batch.status_code == 200
    assert [r["label"] for r in batch.json()] == [r["label"] for r in expected[:8]]
    assert [r["score"] for r in batch.json()] == pytest.approx([r["score"] for r in expected[:8]], abs=1e-6)
    assert set(batch.json()[0]) == {"label", "score"}  # exactly predict's fields


def test_all_scores_gives_every_label_a_probability(server):
    out = server.post({"text": "a sentence", "text_pair": "another"}, params={"all_scores": "true"}).json()
    assert set(out["scores"]) == {"LABEL_0", "LABEL_1"}
    assert sum(out["scores"].values()) == pytest.approx(1.0, abs=1e-6)
    assert out["scores"][out["label"]] == pytest.approx(out["score"])


def test_concurrent_requests_are_batched(server, tiny_model_dir, rows):
    expected = list(predict_rows(str(tiny_model_dir), rows))
    before = server.metadata()["batching"]
    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: server.post({"text": rows.text[i], "text_pair": rows.text_pair[i]}),
                                range(16)))
    wall = time.perf_counter() - started
    after = server.metadata()["batching"]
    assert 0 < after["model_seconds"] - before["model_seconds"] <= wall  # the model's busy time, within the wall
    assert [a.status_code for a in answers] == [200] * 16
    assert [a.json()["label"] for a in answers] == [r["label"] for r in expected[:16]]
    assert [a.json()["score"] for a in answers] == pytest.approx([r["score"] for r in expected[:16]], abs=1e-6)
    assert after["inputs"] - before["inputs"] == 16
    assert after["batches"] - before["batches"] < 16  # some requests shared a forward pass
    assert after["largest_batch"] > 1


BAD_REQUESTS = [
    ("malformed JSON", b'{"text": "unclosed', 400, "body"),
    ("missing text", {"text_pair": "only a pair"}, 422, "text"),
    ("text not a string", {"text": 42}, 422, "text"),
    ("text_pair not a string", {"text": "a", "text_pair": ["b"]}, 422, "text_pair"),
    ("unknown field", {"text": "a", "label": "equivalent"}, 422, "label"),
    ("not an object", "just a string", 422, "body"),
    ("empty list", [], 422, "body"),
    ("bad item in a list", [{"text": "a"}, {"text": None}], 422, "[1].text"),
    ("too many inputs", [{"text": "a"}] * 9, 413, "body"),
    ("body over the size limit", {"text": "x" * 30000}, 413, "body"),
    ("pairs for some inputs only", [{"text": "a"}, {"text": "b", "text_pair": "c"}], 422, "text_pair"),
]


@pytest.mark.parametrize("name,body,status,field", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_a_4xx_naming_the_field_and_the_server_goes_on(server, name, body, status, field):
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    answer = server.post(body)
    assert answer.status_code == status, answer.text
    assert answer.json()["field"] == field
    assert field in answer.json()["error"]
    assert server.post({"text": "still serving"}).status_code == 200


def test_a_streamed_body_over_the_limit_is_refused(server):
    def chunks():  # no Content-Length: the server counts what arrives
        yield b'{"text": "'
        for _ in range(30):
            yield b"y" * 1000
        yield b'"}'

    answer = httpx.post(f"{server.url}/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and answer.json()["field"] == "body"
    assert server.post({"text": "still serving"}).status_code == 200


def test_health_metadata_and_openapi(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    meta = server.metadata()
    assert meta["labels"] == ["LABEL_0", "LABEL_1"] and meta["runtime"] == "torch" and meta["precision"] == "fp32"
    assert meta["max_length"] == 512 and meta["batching"]["max_wait_ms"] == 200
    assert "/predict" in httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert httpx.get(f"{server.url}/docs").status_code == 200


def test_sigterm_during_a_request_still_answers_it_and_exits_0(tiny_model_dir, tmp_path):
    # A wait of 3 s keeps the request in the batcher while SIGTERM arrives; a lone input waits only after a
    # batch of several, so one comes first.
    srv = Server(tiny_model_dir, tmp_path / "server.log", "--max-wait-ms", "3000")
    assert srv.post([{"text": "a", "text_pair": "b"}, {"text": "c", "text_pair": "d"}]).status_code == 200
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(r=srv.post({"text": "in flight", "text_pair": "still"})))
    try:
        thread.start()
        deadline = time.monotonic() + 30
        while srv.metadata()["batching"]["in_flight"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.metadata()["batching"]["in_flight"] == 1
        srv.proc.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
    finally:
        srv.stop()
    assert answer["r"].status_code == 200 and answer["r"].json()["label"].startswith("LABEL_")
    assert srv.proc.wait(timeout=120) == 0
    assert "Shutting down" in srv.log.read_text()


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneloop", "serve", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_gathered_batch_runs_in_length_sorted_model_calls_with_predicts_answers(tiny_model_dir, rows):
    from tuneloop.predict import load_for_prediction, predict_texts
    from tuneloop.serve import Batcher

    model, tokenizer = load_for_prediction(str(tiny_model_dir), None, "torch")
    shapes = []
    model.register_forward_hook(lambda module, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)),
                                with_kwargs=True)
    items = list(zip(rows.text.head(10), rows.text_pair.head(10)))
    batcher = Batcher(model, tokenizer, max_batch_size=32, max_wait_ms=0, model_batch_size=4)
    served = batcher.forward(items)
    assert [n for n, _ in shapes] == [4, 4, 2]  # 10 inputs in calls of at most model_batch_size
    assert all(length % 8 == 0 for _, length in shapes)  # padded to a multiple of 8: few distinct shapes
    assert [length for _, length in shapes] == sorted((length for _, length in shapes), reverse=True)
    shapes.clear()
    alone = predict_texts(model, tokenizer, [a for a, _ in items], [b for _, b in items], batch_size=32, all_scores=True)
    assert len(shapes) == 1
    assert [r["label"] for r in served] == [r["label"] for r in alone]
    for s, a in zip(served, alone):
        assert s["score"] == pytest.approx(a["score"], abs=1e-5)


async def collect_timed(batcher, arrivals: list[float], queued_first: int = 0) -> tuple[int, float]:
    """Batch size and seconds from the last arrival to the batch being ready; inputs join at `arrivals` (s)."""
    loop = asyncio.get_running_loop()
    for _ in range(queued_first):  # inputs that queued while the model ran
        batcher.queue.put_nowait((("a", None), None))
    stamps = []

    async def arrive(delay):
        await asyncio.sleep(delay)
        stamps.append(loop.time())
        batcher.queue.put_nowait((("b", None), None))

    arrivals_done = [asyncio.create_task(arrive(d)) for d in arrivals]
    batch = await batcher.collect()
    ready = loop.time()
    await asyncio.gather(*arrivals_done)
    return len(batch), ready - max(stamps, default=ready)


def test_the_batcher_waits_only_where_another_input_can_join():
    from tuneloop.serve import Batcher

    def scenario(last_batch, arrivals, queued_first=0):
        batcher = Batcher(None, None, max_batch_size=8, max_wait_ms=1000)
        batcher.stats["last_batch"] = last_batch
        try:
            return asyncio.run(collect_timed(batcher, arrivals, queued_first))
        finally:
            batcher.executor.shutdown()

    # One client: its input finds the model idle and the queue empty after a batch of one; nobody can join.
    size, waited = scenario(last_batch=1, arrivals=[0.05])
    assert size == 1 and waited < 0.5
    # An input that queued while the model ran: others are about, so it waits and the next one joins.
    size, waited = scenario(last_batch=1, arrivals=[0.05], queued_first=1)
    assert size == 2 and waited > 0.5  # then waited out the rest of max_wait
    # After a batch of several, a lone arrival waits for the others to come back.
    size, waited = scenario(last_batch=5, arrivals=[0.05, 0.1])
    assert size == 2 and waited > 0.5


def test_the_model_is_loaded_on_the_thread_that_runs_it(tiny_model_dir, rows, monkeypatch):
    # Two threads running torch's CPU kernels each get an OpenMP team, and forward passes then ran up to 2x
    # slower (tuneloop.serve.model_thread): the server's torch work stays on the batcher's one thread.
    import tuneloop.serve as serve

    threads = {}

    def load_and_record(settings):
        threads["load"] = threading.current_thread()
        return real_load(settings)

    real_load = serve.load_model
    monkeypatch.setattr(serve, "load_model", load_and_record)
    app = serve.create_app(serve.ServeSettings(model_dir=str(tiny_model_dir), precision="bf16").check())
    batcher = app.state.batcher
    batcher.model.register_forward_hook(lambda *_: threads.update(forward=threading.current_thread()))
    try:
        out = batcher.executor.submit(batcher.forward, [(rows.text[0], rows.text_pair[0])]).result()
    finally:
        batcher.executor.shutdown()
    assert out[0]["label"].startswith("LABEL_")
    assert threads["load"] is threads["forward"] and threads["load"] is not threading.main_thread()


def test_a_model_batch_size_below_1_is_one_line(tiny_model_dir):
    proc = run_serve("--model-dir", str(tiny_model_dir), "--model-batch-size", "0", "--port", str(free_port()))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["tuneloop: error: --model-batch-size: must be at least 1, got 0"]


def test_port_in_use_is_one_line(tiny_model_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = run_serve("--model-dir", str(tiny_model_dir), "--port", str(port))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"tuneloop: error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use); "
        f"choose another --port or stop what holds it"]


def test_a_folder_that_is_not_a_model_stops_serve_with_one_line(tmp_path):
    proc = run_serve("--model-dir", str(tmp_path), "--port", str(free_port()))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"tuneloop: error: model folder {tmp_path} has no config.json (not a Hugging Face model folder)"]


def test_runtime_onnx_on_a_folder_without_onnx_is_one_line(tiny_model_dir):
    proc = run_serve("--model-dir", str(tiny_model_dir), "--runtime", "onnx", "--port", str(free_port()))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"tuneloop: error: --runtime onnx: {tiny_model_dir} holds no model.onnx; write one with tuneloop export "
        f"--model-dir {tiny_model_dir} --output-dir DIR --format onnx"]


@pytest.fixture(scope="module")
def tiny_onnx_dir(tiny_model_dir, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    from tuneloop.onnx_export import export_onnx

    return export_onnx(str(tiny_model_dir), str(tmp_path_factory.mktemp("serve-onnx") / "fp32"))


def test_runtime_onnx_serves_what_predict_runtime_onnx_gives(tiny_onnx_dir, rows, tmp_path):
    srv = Server(tiny_onnx_dir, tmp_path / "server.log", "--runtime", "onnx")
    try:
        expected = list(predict_rows(str(tiny_onnx_dir), rows.head(6), runtime="onnx"))
        got = srv.post([{"text": a, "text_pair": b} for a, b in zip(rows.text[:6], rows.text_pair[:6])])
        assert got.status_code == 200
        assert [r["label"] for r in got.json()] == [r["label"] for r in expected]
        assert [r["score"] for r in got.json()] == pytest.approx([r["score"] for r in expected], abs=1e-6)
        assert srv.metadata()["runtime"] == "onnx" and srv.metadata()["precision"] is None
    finally:
        code = srv.stop()  # an assertion here would hide the one that failed above
    assert code == 0, srv.log.read_text()[-3000:]


def test_batching_makes_onnx_runtimes_threads_sleep_between_batches(tiny_onnx_dir):
    from tuneloop.serve import ServeSettings, load_model

    key = "session.intra_op.allow_spinning"
    model, _ = load_model(ServeSettings(model_dir=str(tiny_onnx_dir), runtime="onnx", max_batch_size=32))
    assert model.session.get_session_options().get_session_config_entry(key) == "0"
    model, _ = load_model(ServeSettings(model_dir=str(tiny_onnx_dir), runtime="onnx", max_batch_size=1))
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ONNX Runtime's default: spinning
        model.session.get_session_options().get_session_config_entry(key)


def test_precision_bf16_serves_bf16_weights_in_calls_of_16_and_says_so(tiny_model_dir):
    import torch

    from tuneloop.serve import ServeSettings, describe_model, load_model

    settings = ServeSettings(model_dir=str(tiny_model_dir), precision="bf16").check()
    model, tokenizer = load_model(settings)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert describe_model(settings, model, tokenizer)["precision"] == "bf16"
    # Model calls of 16 in bf16, 8 in fp32, unless set.
    assert settings.model_batch_size == 16
    assert ServeSettings(model_dir=str(tiny_model_dir)).check().model_batch_size == 8
    assert ServeSettings(model_dir=str(tiny_model_dir), precision="bf16", model_batch_size=4).check().model_batch_size == 4


def test_precision_bf16_with_onnx_stops_serve_with_one_line(tiny_model_dir):
    proc = run_serve("--model-dir", str(tiny_model_dir), "--runtime", "onnx", "--precision", "bf16",
                     "--port", str(free_port()))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "tuneloop: error: --precision bf16 runs with --runtime torch; ONNX Runtime's fast CPU path is --quantize int8"]


# ---- the try-it page in headless Chromium, driven over the DevTools protocol on a pipe (no extra package) ----

class Chromium:
    """Headless Chromium with `--remote-debugging-pipe`: DevTools messages are NUL-terminated JSON on fds 3 and 4."""

    def __init__(self, path: str, profile: Path, size: str = "760,640"):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def pipes_on_3_and_4():
            import fcntl

            # Copied above 10 first: a pipe end may itself be fd 3 or 4, and dup2 onto itself would leave it
            # close-on-exec.
            high_r, high_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w))
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--hide-scrollbars", f"--window-size={size}",
                 f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen([path, *flags], preexec_fn=pipes_on_3_and_4, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer, self._next_id, self.events = b"", 0, []
        self.session = None

    def _read_message(self, timeout: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], timeout)
            if not ready:
                raise TimeoutError("no DevTools message from Chromium")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise EOFError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, timeout: float = 60, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read_message(timeout)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if event.get("method") == method:
                    return event
            self.events.append(self._read_message(deadline - time.monotonic()))
        raise TimeoutError(method)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(expression)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Page.navigate", url=url)
        self.wait_for_event("Page.loadEventFired")

    def type_into(self, element_id: str, text: str) -> None:
        self.evaluate(f"document.getElementById({json.dumps(element_id)}).focus()")
        self.send("Input.insertText", text=text)

    def click(self, element_id: str) -> None:
        box = self.evaluate(f"(() => {{ const r = document.getElementById({json.dumps(element_id)})"
                            f".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def screenshot(self, target: Path) -> None:
        target.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def console_problems(self) -> list[dict]:
        problems = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown" or (method == "Log.entryAdded" and params["entry"]["level"] == "error") \
                    or (method == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning", "assert")):
                problems.append(event)
        return problems

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (TimeoutError, EOFError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        pytest.skip("no chromium on PATH (.ci/run installs Debian's chromium package)")
    return path


def try_the_page(url: str, profile: Path, text: str, pair: str | None, screenshot: Path) -> tuple[dict, list[dict]]:
    """Open the page, type, click, read what it shows; returns (what the page shows, console problems)."""
    browser = Chromium(chromium_path(), profile)
    try:
        browser.open(url)
        browser.wait_until("document.getElementById('meta').textContent.includes('labels:')")
        browser.type_into("text", text)
        if pair is not None:
            browser.type_into("text_pair", pair)
        browser.click("go")
        browser.wait_until("!document.getElementById('result').hidden")
        shown = browser.evaluate("({label: document.getElementById('label').textContent,"
                                 " bars: [...document.querySelectorAll('#bars .row')].map(r => r.textContent),"
                                 " widths: [...document.querySelectorAll('#bars .bar')].map(b => b.style.width),"
                                 " error: document.getElementById('error').textContent,"
                                 " meta: document.getElementById('meta').textContent})")
        browser.screenshot(screenshot)
        return shown, browser.console_problems()
    finally:
        browser.close()


def test_page_types_clicks_and_shows_the_label_without_console_errors(server, tiny_model_dir, tmp_path):
    text, pair = "The company said profits rose.", "Profits went up, the company said."
    expected = list(predict_rows(str(tiny_model_dir), pd.DataFrame({"text": [text], "text_pair": [pair]})))[0]
    shown, problems = try_the_page(f"{server.url}/", tmp_path / "profile", text, pair, tmp_path / "page.png")
    assert problems == []
    assert shown["error"] == ""
    assert shown["label"] == expected["label"]
    assert len(shown["bars"]) == 2 and shown["bars"][0].startswith(expected["label"])
    assert f"{expected['score']:.3f}" in shown["bars"][0]
    assert float(shown["widths"][0].rstrip("%")) == pytest.approx(expected["score"] * 100, abs=1e-4)
    assert "LABEL_0, LABEL_1" in shown["meta"]
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_page_loads_nothing_from_outside(server):
    page = httpx.get(f"{server.url}/").text
    assert "<textarea" in page and "http://" not in page and "https://" not in page and "//cdn" not in page


def test_without_the_serve_extra_serve_says_what_to_install(tiny_model_dir):
    code = ("import sys; sys.modules['uvicorn'] = None; from tuneloop.cli import main; "
            f"sys.exit(main(['serve', '--model-dir', {str(tiny_model_dir)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "tuneloop: error: tuneloop serve needs fastapi and uvicorn, which are not installed: pip install 'tuneloop[serve]'"]


def test_workers_start_several_processes_that_serve_and_stop_with_exit_0(tiny_model_dir, tmp_path):
    srv = Server(tiny_model_dir, tmp_path / "server.log", "--workers", "2")
    try:
        assert srv.post({"text": "served by a worker"}).status_code == 200
        deadline = time.monotonic() + START_TIMEOUT
        while srv.log.read_text().count("Started server process") < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        started = [line for line in srv.log.read_text().splitlines() if "Started server process" in line]
        assert len(started) == 2 and srv.metadata()["pid"] != srv.proc.pid  # workers answer, not the parent
    finally:
        assert srv.stop() == 0
