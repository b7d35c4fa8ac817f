"""`tuneloop serve`: a saved model behind HTTP (FastAPI + uvicorn), with dynamic batching and a try-it page.

Every input of every request goes into one queue; a batcher takes what has arrived, up to `max_batch_size`
inputs or until `max_wait_ms` after the first, and runs them through `predict`'s own path (`predict_texts`:
truncation, length sorting, model calls of `model_batch_size` inputs padded to their longest, label names),
one batch at a time in a worker thread, so the event loop keeps accepting requests while the model runs and
the next batch grows with the load.
Each server is stateless: scale out with replicas behind any load balancer, or `--workers N` on one machine.
"""

import asyncio
import dataclasses
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from tuneloop.config import setting
from tuneloop.errors import ConfigError, TuneloopError

SETTINGS_ENV = "TUNELOOP_SERVE_SETTINGS"  # how `--workers N` hands the settings to each worker process


# Inputs per model call, model-only on gathered batches of 32 random MRPC dev pairs: fp32 ran fastest in calls of
# 8 (86.5 rows/s, 16: 81.3, 32: 58.2; 2-core AMD EPYC), bf16 in calls of 16 (456, 8: 342, 32: 369; 2-core Xeon
# with AMX, whose tiles pay off on larger matrices). Re-checked in bf16 after the model moved to one thread, servers
# in turns at 32 clients: calls of 16 318.8 requests/s, 32 312.5, 8 264.1.
MODEL_BATCH_SIZE = {"fp32": 8, "bf16": 16}


@dataclass
class ServeSettings:
    """What `tuneloop serve` takes; the flags and their defaults come from here."""

    model_dir: str = setting(None, "saved model folder (OUT/model, OUT/model-merged, or an export; ONNX for --runtime onnx)",
                        metavar="DIR")
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = setting(8000, "TCP port to listen on")
    runtime: str = setting("torch", "torch (PyTorch) or onnx (ONNX Runtime, on a folder from export --format onnx)",
                      metavar="torch|onnx")
    quantize: Optional[str] = setting(None, "int8: int8 Linear layers (torch) or ONNX Runtime int8 quantisation (onnx)",
                               metavar="int8")
    precision: str = setting("fp32", "bf16: torch with bf16 weights, faster on CPUs with AVX512-BF16/AMX",
                             metavar="fp32|bf16")
    workers: int = setting(1, "server processes on this machine, each with its own model and batcher")
    max_batch_size: int = setting(32, "most inputs the batcher gathers at once (1: no dynamic batching)")
    model_batch_size: Optional[int] = setting(
        None, "most inputs per model call: a gathered batch is sorted by length and run in calls of this many, so "
              "short inputs are not padded to the longest of 32 (null: 16 with --precision bf16, else 8)")
    max_wait_ms: float = setting(5.0, "how long the first input of a batch waits for others to join it "
                                          "(not at all alone on an idle server)")
    max_inputs: int = setting(256, "most inputs in one request (more: 413)")
    max_body_bytes: int = setting(1_000_000, "largest request body in bytes (larger: 413)")
    threads: Optional[int] = setting(None, "CPU threads per forward pass (null: the runtime's choice)")
    access_log: bool = setting(True, "log one line per request")

    def check(self) -> "ServeSettings":
        from tuneloop.export import check_quantize
        from tuneloop.predict import check_precision, check_runtime

        if not self.model_dir:
            raise ConfigError("serve needs --model-dir (a folder written by tuneloop train or export)")
        check_runtime(self.runtime)
        check_quantize(self.quantize)
        check_precision(self.precision, self.runtime, self.quantize)
        if self.model_batch_size is None:
            self.model_batch_size = MODEL_BATCH_SIZE[self.precision]
        for name in ("workers", "max_batch_size", "model_batch_size", "max_inputs", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms: must be >= 0, got {self.max_wait_ms}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port: must be between 1 and 65535, got {self.port}")
        return self


class RequestError(Exception):
    """A bad request: its HTTP status, the field at fault and what is wrong."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


class Batcher:
    """Groups the inputs of concurrent requests into batches, runs one batch at a time off the event loop."""

    def __init__(self, model, tokenizer, max_batch_size: int, max_wait_ms: float, max_length: int = 512,
                 model_batch_size: int | None = None, executor: ThreadPoolExecutor | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.model_batch_size = min(model_batch_size or max_batch_size, max_batch_size)
        self.max_length = max_length
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = executor or model_thread()
        self.stats = {"batches": 0, "inputs": 0, "largest_batch": 0, "last_batch": 0, "model_seconds": 0.0}
        self.in_flight = 0  # inputs received and not yet answered

    async def predict(self, inputs: list[tuple[str, str | None]]) -> list[dict]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in inputs]
        for item, future in zip(inputs, futures):
            self.queue.put_nowait((item, future))
        self.in_flight += len(inputs)
        try:
            return list(await asyncio.gather(*futures))
        finally:
            self.in_flight -= len(inputs)

    async def collect(self) -> list:
        """The next batch: the first waiting input, then whatever joins it within max_wait (up to the size).

        An input that finds the model idle and the queue empty after a batch of one waits for nobody: that is
        what one client sees, whose next request comes only after this answer, so a wait would only delay it.
        Signs of concurrency (inputs that queued while the model ran, or a last batch of several) bring the
        wait back, so under load batches grow as before."""
        loop = asyncio.get_running_loop()
        idle = self.queue.empty()
        batch = [await self.queue.get()]
        deadline = loop.time() + (0 if idle and self.stats["last_batch"] <= 1 else self.max_wait)
        while len(batch) < self.max_batch_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.collect()
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.forward, [item for item, _ in batch])
            except Exception as e:  # the model failed on this batch: its requests get a 500, the server goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            finally:  # the model's busy time: its share of the wall says whether the model or HTTP bounds the server
                self.stats["model_seconds"] += time.perf_counter() - started
            for (_, future), result in zip(batch, results):
                if not future.done():  # a client that went away leaves a cancelled future
                    future.set_result(result)

    def forward(self, items: list[tuple[str, str | None]]) -> list[dict]:
        from tuneloop.predict import predict_texts

        self.stats["batches"] += 1
        self.stats["inputs"] += len(items)
        self.stats["last_batch"] = len(items)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
        results: list[dict | None] = [None] * len(items)
        for has_pair in (False, True):  # a batch may mix single texts and pairs from different requests
            idx = [i for i, (_, pair) in enumerate(items) if (pair is not None) == has_pair]
            if idx:
                out = predict_texts(self.model, self.tokenizer, [items[i][0] for i in idx],
                                    [items[i][1] for i in idx] if has_pair else None,
                                    batch_size=self.model_batch_size, max_length=self.max_length, all_scores=True)
                for i, row in zip(idx, out):
                    results[i] = row
        return results


def input_model():
    from pydantic import BaseModel, ConfigDict, StrictStr

    class PredictInput(BaseModel):
        """One input: a text, and its pair for pair tasks (MRPC, RTE, ...)."""

        model_config = ConfigDict(extra="forbid")
        text: StrictStr
        text_pair: Optional[StrictStr] = None

    return PredictInput


def describe_error(error: dict, prefix: str) -> RequestError:
    loc = ".".join(str(p) for p in error["loc"])
    name = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "body"
    kind = error["type"]
    if kind == "missing":
        message = f"{name}: required field is missing"
    elif kind == "extra_forbidden":
        message = f"{name}: unknown field (an input has text and, for pairs, text_pair)"
    elif kind in ("string_type", "model_type"):
        message = f"{name}: must be {'a string' if kind == 'string_type' else 'an object'}"
    else:
        message = f"{name}: {error['msg']}"
    return RequestError(422, name, message)


def parse_inputs(body: bytes, max_inputs: int, schema) -> tuple[list[tuple[str, str | None]], bool]:
    """(text, text_pair) per input and whether the request sent a list; RequestError names what is wrong."""
    from pydantic import ValidationError

    try:
        payload = json.loads(body)
    except ValueError as e:
        raise RequestError(400, "body", f"body: not valid JSON ({e})") from None
    many = isinstance(payload, list)
    items = payload if many else [payload]
    if not many and not isinstance(payload, dict):
        raise RequestError(422, "body", "body: must be an object {\"text\": ..., \"text_pair\": ...} or a list of them")
    if many and not items:
        raise RequestError(422, "body", "body: empty list; send at least one input")
    if len(items) > max_inputs:
        raise RequestError(413, "body", f"body: {len(items)} inputs in one request; at most {max_inputs} (--max-inputs)")
    inputs = []
    for i, item in enumerate(items):
        try:
            parsed = schema.model_validate(item)
        except ValidationError as e:
            raise describe_error(e.errors()[0], f"[{i}]." if many else "") from None
        inputs.append((parsed.text, parsed.text_pair))
    return inputs, many


async def read_body(request, limit: int) -> bytes:
    """The request body, refused once it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "body", f"body: {declared} bytes; at most {limit} (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body", f"body: over {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def page_html() -> str:
    return resources.files("tuneloop").joinpath("web/index.html").read_text(encoding="utf-8")


def text_inputs(model_dir: str) -> int | None:
    """How many texts an input has (1 or 2) where the run's config.yaml beside the model says; else None."""
    import yaml

    from tuneloop.tasks import TASKS

    for config in (Path(model_dir) / "config.yaml", Path(model_dir).parent / "config.yaml"):
        if config.is_file():
            data = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data", {})
            if data.get("text_columns"):
                return len(data["text_columns"])
            if data.get("task") in TASKS:
                return len(TASKS[data["task"]].hub_text_columns)
    return None


def describe_model(settings: ServeSettings, model, tokenizer) -> dict:
    from tuneloop.predict import max_input_length

    config = model.config
    regression = config.problem_type == "regression"
    return {"model_dir": str(settings.model_dir), "runtime": settings.runtime,
            "quantize": getattr(model, "quantize", None) or settings.quantize,
            "precision": settings.precision if settings.runtime == "torch" else None,  # ONNX: the graph's own, see quantize
            "problem_type": config.problem_type or "single_label_classification",
            "labels": [config.id2label[i] for i in range(1 if regression else config.num_labels)],
            "max_length": max_input_length(tokenizer), "text_inputs": text_inputs(settings.model_dir),
            "limits": {"max_inputs": settings.max_inputs, "max_body_bytes": settings.max_body_bytes}}


def model_thread() -> ThreadPoolExecutor:
    """The one thread that loads the model and runs every forward pass.

    Each thread that runs torch's parallel CPU kernels gets its own OpenMP team, and once two threads had
    teams, every forward pass ran slower: one MRPC pair at a time in bf16, 126 pairs/s loaded and run on one
    thread, 59 loaded (cast to bf16) on the main thread and run on a worker (fp32 after a worker had run:
    84 -> 55; 2-core Xeon, docs/serving.md). So the server loads the model on the thread that runs it."""
    return ThreadPoolExecutor(1, thread_name_prefix="tuneloop-model")


def load_model(settings: ServeSettings):
    """The model and tokenizer; when batching, ONNX Runtime's threads sleep between forward passes.

    Threads that spin after a forward pass hold the cores of a small machine while the event loop has the next
    batch's requests to read. Side by side at 32 clients on a 2-core Xeon (ORT int8, 3 x 1,500 requests each,
    docs/serving.md): 144.1 requests/s with sleeping threads, 127.5 spinning. torch's OpenMP threads gained
    nothing from sleeping there (OMP_WAIT_POLICY=PASSIVE: 76.6 vs 77.4), so they are left as they are."""
    from tuneloop.predict import load_for_prediction

    spin = settings.max_batch_size == 1
    return load_for_prediction(settings.model_dir, settings.quantize, settings.runtime, settings.threads, spin,
                               settings.precision)


def error_response(status: int, field: str, message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message, "field": field}, status_code=status)


def add_error_handlers(app) -> None:
    """Every bad request answers {"error": ..., "field": ...} with a 4xx status."""
    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestError)
    async def bad_request(request, e: RequestError):
        return error_response(e.status, e.field, e.message)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request, e: RequestValidationError):  # a query parameter such as ?all_scores=maybe
        error = describe_error({**e.errors()[0], "loc": e.errors()[0]["loc"][1:]}, "")
        return error_response(error.status, error.field, error.message)


def create_app(settings: ServeSettings, model=None, tokenizer=None, executor: ThreadPoolExecutor | None = None):
    """The FastAPI app: POST /predict, GET /health, GET /metadata, the page at /, OpenAPI docs at /docs."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    executor = executor or model_thread()
    if model is None:
        model, tokenizer = executor.submit(load_model, settings).result()
    info = describe_model(settings, model, tokenizer)
    batcher = Batcher(model, tokenizer, settings.max_batch_size, settings.max_wait_ms,
                      model_batch_size=settings.model_batch_size, executor=executor)
    schema = input_model()

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield  # uvicorn stops accepting and lets in-flight requests finish before it gets here on SIGTERM
        task.cancel()
        batcher.executor.shutdown(wait=True)

    app = FastAPI(title="tuneloop serve", version="1", lifespan=lifespan,
                  description=f"{info['problem_type']} over {', '.join(info['labels'])} ({settings.runtime})")

    app.state.batcher = batcher
    add_error_handlers(app)
    item_schema = schema.model_json_schema()
    body_schema = {"anyOf": [item_schema, {"type": "array", "items": item_schema, "minItems": 1,
                                           "maxItems": settings.max_inputs}]}

    @app.post("/predict", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": body_schema}}}})
    async def predict(request: Request, all_scores: bool = False):
        """One input `{"text": ..., "text_pair": ...}` or a list; returns `{label, score}` (or a list), as `predict`.

        `?all_scores=true` adds `scores`: every label's probability."""
        inputs, many = parse_inputs(await read_body(request, settings.max_body_bytes), settings.max_inputs, schema)
        if len({pair is None for _, pair in inputs}) > 1:
            raise RequestError(422, "text_pair", "text_pair: give it for every input of a request or for none")
        results = await batcher.predict(inputs)
        if not all_scores:
            results = [{k: v for k, v in r.items() if k != "scores"} for r in results]
        return JSONResponse(results if many else results[0])

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata():
        return {**info, "batching": {"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms,
                                     "model_batch_size": batcher.model_batch_size, **batcher.stats,
                                     "in_flight": batcher.in_flight}, "pid": os.getpid()}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(page_html())

    return app


def app_from_env():
    """The app of one `--workers N` process, from the settings the parent put in the environment."""
    return create_app(ServeSettings(**json.loads(os.environ[SETTINGS_ENV])))


def check_port_free(host: str, port: int) -> None:
    """Fail with one line before loading anything if the address is taken (uvicorn would log and exit 1)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as e:
            raise TuneloopError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); "
                                f"choose another --port or stop what holds it") from None


def require_serving() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise TuneloopError("tuneloop serve needs fastapi and uvicorn, which are not installed: "
                            "pip install 'tuneloop[serve]'") from None


def serve(settings: ServeSettings) -> None:
    """Run the server until SIGTERM or Ctrl-C; in-flight requests are answered before it exits."""
    require_serving()
    import uvicorn

    settings.check()
    check_port_free(settings.host, settings.port)
    executor = model_thread()
    model, tokenizer = executor.submit(load_model, settings).result()  # not a model: stops here, with one line
    # uvicorn re-raises the signal it stopped on once it has shut down; a no-op handler lets the exit be 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    options = dict(host=settings.host, port=settings.port, access_log=settings.access_log,
                   timeout_graceful_shutdown=None, log_level="info")
    started = time.monotonic()
    if settings.workers > 1:
        os.environ[SETTINGS_ENV] = json.dumps(dataclasses.asdict(settings))
        del model, tokenizer
        executor.shutdown()
        uvicorn.run("tuneloop.serve:app_from_env", factory=True, workers=settings.workers, **options)
    else:
        uvicorn.run(create_app(settings, model, tokenizer, executor), **options)
    print(f"tuneloop: serve stopped after {time.monotonic() - started:.0f} s", flush=True)
