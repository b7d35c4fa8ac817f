"""Prediction runtimes and HTTP serving, side by side in one run, on a saved MRPC model.

    HF_HUB_OFFLINE=1 python benchmarks/serving.py --model-dir runs/mrpc/model            # the full run
    HF_HUB_OFFLINE=1 python benchmarks/serving.py --model-dir runs/mrpc/model --quick    # a few minutes

Prediction rows (MRPC dev, batch 32, each variant loaded and warmed up, then timed in turns): torch fp32, torch int8
(`predict --quantize int8`), torch bf16 (`--precision bf16`, on CPUs with fast bf16), ONNX Runtime fp32 and int8 (`export --format onnx [--quantize int8]`): dev
accuracy, F1, predictions/s, model size; plus the largest |logit| difference of ORT fp32 from torch.
Serving rows: two `tuneloop serve` subprocesses, one with dynamic batching (`--max-batch-size 32`) and one
without (`--max-batch-size 1`), and a real HTTP client on localhost sending single-pair requests from
`--clients` concurrent connections to each in turn: requests/s, p50/p99 latency, errors; then `--rounds` more
turns at the highest concurrency (the batching ratio is their median), and the batching server's peak RSS
over `--rss-requests` requests. The client shares the machine's cores with the server, so it should cost
little: wrk (C; `apt install wrk`) where installed, else httpx (Python), which on two cores takes a fifth of
the CPU from the batching server (docs/serving.md).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WRK_SCRIPT = Path(__file__).with_name("wrk_predict.lua")
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, help="saved MRPC model folder (OUT/model)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "glue" / "MRPC"))
    p.add_argument("--work-dir", default=str(ROOT / "benchmarks" / "work-serving"), help="ONNX exports and logs")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results-serving.json"))
    p.add_argument("--quick", action="store_true", help="64 dev rows, 100 requests per point, 500 for RSS")
    p.add_argument("--requests", type=int, default=2000, help="requests per serving point")
    p.add_argument("--rss-requests", type=int, default=10000, help="requests over which the server's RSS is watched")
    p.add_argument("--clients", default="1,8,32", help="concurrent clients per serving point")
    p.add_argument("--serve-runtime", default="torch", choices=("torch", "onnx"),
                   help="the runtime `tuneloop serve` runs with (onnx: on the int8 export)")
    p.add_argument("--serve-precision", default="fp32", choices=("fp32", "bf16"),
                   help="`tuneloop serve --precision` for the serving rows (torch runtime)")
    p.add_argument("--client", default="auto", choices=("auto", "wrk", "httpx"),
                   help="HTTP load generator (auto: wrk where installed, else httpx)")
    p.add_argument("--rounds", type=int, default=5, help="turns of both servers at the highest concurrency")
    p.add_argument("--round-requests", type=int, default=1500, help="requests per server per round")
    p.add_argument("--repeats", type=int, default=5, help="timed passes over dev per prediction row, taken in turns "
                   "across the rows (median)")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.rss_requests, args.repeats, args.rounds, args.round_requests = 100, 500, 1, 1, 100
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "httpx"
    args.work_dir = Path(args.work_dir)
    return args


def dev_pairs(data_dir: str, limit: int | None = None):
    import pandas as pd

    dev = pd.read_csv(Path(data_dir) / "dev.tsv", sep="\t", quoting=3, encoding="utf-8-sig")
    dev = dev.head(limit) if limit else dev
    return pd.DataFrame({"text": dev["#1 String"], "text_pair": dev["#2 String"]}), dev["Quality"].tolist()


def scores(rows: list[dict], gold: list[int], label2id: dict) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    pred = [label2id[r["label"]] for r in rows]
    return {"accuracy": accuracy_score(gold, pred), "f1": f1_score(gold, pred)}


def state_mb(model) -> float:
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 2**20


def prediction_rows(args, fp32_dir: Path, int8_dir: Path) -> tuple[list[dict], float]:
    import numpy as np
    import torch

    from tuneloop.predict import load_for_prediction, predict_with

    df, gold = dev_pairs(args.data_dir, 64 if args.quick else None)
    from tuneloop.precision import cpu_has_fast_bf16

    variants = [("torch fp32", args.model_dir, "torch", None, "fp32"),
                ("torch int8", args.model_dir, "torch", "int8", "fp32"),
                *([("torch bf16", args.model_dir, "torch", None, "bf16")] if cpu_has_fast_bf16() else []),
                ("ORT fp32", fp32_dir, "onnx", None, "fp32"), ("ORT int8", int8_dir, "onnx", None, "fp32")]
    # Every variant loaded and warmed up first, then timed in turns (one pass each, `--repeats` rounds): a drift
    # of the machine's speed during the run then falls on all four alike instead of on one row's ratio.
    loaded = {}
    for name, folder, runtime, quantize, precision in variants:
        model, tokenizer = load_for_prediction(str(folder), quantize, runtime, precision=precision)
        predict_with(model, tokenizer, df.head(32))  # warm-up: kernel choice, allocator, ORT's first run
        loaded[name] = model, tokenizer
    seconds, outs = {name: [] for name in loaded}, {}
    for _ in range(args.repeats):
        for name, (model, tokenizer) in loaded.items():
            start = time.perf_counter()
            outs[name] = predict_with(model, tokenizer, df)
            seconds[name].append(time.perf_counter() - start)
    rows, logits = [], {}
    for name, folder, runtime, quantize, precision in variants:
        model, tokenizer = loaded[name]
        size = (state_mb(model) if quantize or precision != "fp32" else
                sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**20) if runtime == "torch" \
            else (Path(folder) / "model.onnx").stat().st_size / 2**20
        rows.append({"row": name, **scores(outs[name], gold, model.config.label2id), "predictions_per_second":
                     len(df) / statistics.median(seconds[name]), "seconds": seconds[name], "model_mb": size})
        if name.endswith("fp32"):
            batch = tokenizer(df.text.tolist(), df.text_pair.tolist(), padding=True, truncation=True,
                              max_length=512, return_tensors="pt")
            with torch.inference_mode():
                logits[runtime] = model(**batch).logits.numpy()
        print(f"[predict] {name}: {rows[-1]['accuracy']:.4f} acc, {rows[-1]['predictions_per_second']:.1f}/s",
              flush=True)
    return rows, float(np.abs(logits["onnx"] - logits["torch"]).max())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(folder: Path, runtime: str, max_batch_size: int, log: Path,
                 precision: str = "fp32") -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "tuneloop", "serve", "--model-dir", str(folder), "--port", str(port),
           "--runtime", runtime, "--max-batch-size", str(max_batch_size), "--precision", precision, "--no-access-log"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.25)
    raise RuntimeError("server did not start")


async def load(url: str, bodies: list[bytes], clients: int, total: int) -> dict[str, Any]:
    """`clients` connections, each sending its next request when the last is answered, `total` in all."""
    import httpx

    latencies, errors, counter = [], 0, iter(range(total))

    async def client(http):
        nonlocal errors
        for i in counter:
            start = time.perf_counter()
            try:
                r = await http.post(f"{url}/predict", content=bodies[i % len(bodies)],
                                    headers={"Content-Type": "application/json"})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {"requests": total, "errors": errors, "requests_per_second": total / wall,
            "p50_ms": 1000 * latencies[len(latencies) // 2], "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)]}


def watch_rss(pid: int, stop: threading.Event, samples: list[float]) -> None:
    while not stop.is_set():
        samples.append(rss_mb(pid))
        time.sleep(0.2)


def settle(url: str) -> None:
    """Wait until the server has answered every request it took: a load that stops with requests in flight
    (wrk at the end of its time) must not leave work for the next point to pay for."""
    import httpx

    for _ in range(1200):
        if httpx.get(f"{url}/metadata", timeout=60).json()["batching"]["in_flight"] == 0:
            return
        time.sleep(0.1)


def run_wrk(url: str, bodies_file: Path, clients: int, seconds: int) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--timeout", "120s", "-s", str(WRK_SCRIPT), url]
    done = subprocess.run(cmd, env={**os.environ, "BODIES": str(bodies_file)}, capture_output=True, text=True,
                          check=True)
    point = json.loads(done.stdout.strip().splitlines()[-1])
    settle(url)
    return {**point, "requests_per_second": point["requests"] / point["seconds"]}


def wrk_load(url: str, bodies_file: Path, clients: int, total: int) -> dict[str, Any]:
    """wrk runs for a time, not a count: a 3 s pilot measures the rate, then a run long enough for `total`."""
    pilot = run_wrk(url, bodies_file, clients, 3)
    return run_wrk(url, bodies_file, clients, max(5, math.ceil(1.2 * total / pilot["requests_per_second"])))


def client_name(client: str) -> str:
    if client == "httpx":
        import httpx

        return f"httpx {httpx.__version__} (Python, asyncio)"
    version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    return f"{version.split(' Copyright')[0]} (C, one thread)"


def serving_rows(args, folder: Path, runtime: str) -> tuple[list[dict], list[dict], dict]:
    """The points (each concurrency, both servers in turns), `--rounds` more at the highest concurrency, RSS."""
    import httpx

    df, _ = dev_pairs(args.data_dir)
    bodies = [json.dumps({"text": a, "text_pair": b}) for a, b in zip(df.text, df.text_pair)]
    bodies_file = args.work_dir / "bodies.jsonl"
    bodies_file.write_text("\n".join(bodies) + "\n")

    def measure(url: str, clients: int, total: int) -> dict[str, Any]:
        if args.client == "wrk":
            return wrk_load(url, bodies_file, clients, total)
        return asyncio.run(load(url, [b.encode() for b in bodies], clients, total))

    clients = [int(c) for c in args.clients.split(",")]
    servers = {batching: start_server(folder, runtime, size, args.work_dir / f"serve-{size}.log", args.serve_precision)
               for batching, size in (("dynamic batching", 32), ("one at a time", 1))}
    rows, rounds = [], []
    try:
        for proc, url in servers.values():
            asyncio.run(load(url, [b.encode() for b in bodies], 4, 64))  # warm-up
        for n in clients:
            for batching, (proc, url) in servers.items():
                before, started = httpx.get(f"{url}/metadata").json()["batching"], time.perf_counter()
                point = measure(url, n, args.requests)  # with wrk: a pilot, then the measured run
                wall, after = time.perf_counter() - started, httpx.get(f"{url}/metadata").json()["batching"]
                mean_batch = (after["inputs"] - before["inputs"]) / max(1, after["batches"] - before["batches"])
                # the model's busy time over the wall of the load (pilot included): near 1, the model bounds the
                # server, not HTTP
                model_share = (after["model_seconds"] - before["model_seconds"]) / wall
                rows.append({"batching": batching, "clients": n, **point, "mean_batch": mean_batch,
                             "model_share": model_share, "largest_batch": after["largest_batch"]})
                print(f"[serve] {batching}, {n} clients: {point['requests_per_second']:.1f} req/s, "
                      f"p50 {point['p50_ms']:.0f} ms, p99 {point['p99_ms']:.0f} ms, mean batch {mean_batch:.1f}, "
                      f"model busy {model_share:.0%}, {point['errors']} errors", flush=True)
        for i in range(args.rounds):
            rps = {batching: measure(url, max(clients), args.round_requests)["requests_per_second"]
                   for batching, (_, url) in servers.items()}
            rounds.append({**rps, "ratio": rps["dynamic batching"] / rps["one at a time"]})
            print(f"[serve] round {i + 1} at {max(clients)} clients: {rounds[-1]['ratio']:.2f}x", flush=True)
        rss = rss_growth(args, *servers["dynamic batching"], measure, max(clients))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=120)
    return rows, rounds, rss


def rss_growth(args, proc, url: str, measure, clients: int) -> dict[str, Any]:
    before, samples, stop = rss_mb(proc.pid), [], threading.Event()
    watcher = threading.Thread(target=watch_rss, args=(proc.pid, stop, samples))
    watcher.start()
    point = measure(url, clients, args.rss_requests)
    stop.set()
    watcher.join()
    rss = {"requests": point["requests"], "rss_before_mb": before, "peak_rss_mb": max(samples),
           "rss_after_mb": rss_mb(proc.pid), "errors": point["errors"]}
    rss["growth_mb"] = rss["rss_after_mb"] - before
    print(f"[serve] RSS over {point['requests']} requests: {before:.0f} -> peak {rss['peak_rss_mb']:.0f} MB", flush=True)
    return rss


def tables(result: dict) -> str:
    lines = ["| runtime | dev accuracy | dev F1 | predictions/s | model MB |", "|---|---:|---:|---:|---:|"]
    for r in result["prediction"]:
        lines.append(f"| {r['row']} | {r['accuracy']:.4f} | {r['f1']:.4f} | {r['predictions_per_second']:.1f} | "
                     f"{r['model_mb']:.1f} |")
    lines += ["", f"ORT fp32 vs torch fp32, largest |logit| difference on dev: {result['max_logit_diff']:.2e}", "",
              f"Serving: {result['serve_runtime']} {result['serve_precision']}, client {result['client']}", "",
              "| serving | clients | requests | errors | requests/s | p50 ms | p99 ms | mean batch | model busy | "
              "largest batch since start |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["serving"]:  # results written before mean batch and model busy were measured show "-"
        mean = f"{r['mean_batch']:.1f}" if "mean_batch" in r else "-"
        busy = f"{r['model_share']:.0%}" if "model_share" in r else "-"
        lines.append(f"| {r['batching']} | {r['clients']} | {r['requests']} | {r['errors']} | "
                     f"{r['requests_per_second']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {mean} | {busy} | "
                     f"{r['largest_batch']} |")
    rounds = result["rounds"]
    lines += ["", f"{len(rounds)} rounds at {max(r['clients'] for r in result['serving'])} clients, servers in turns: "
                  f"dynamic batching {statistics.median(r['dynamic batching'] for r in rounds):.1f} requests/s against "
                  f"{statistics.median(r['one at a time'] for r in rounds):.1f} one at a time (medians); ratio per round "
                  + ", ".join(f"{r['ratio']:.2f}" for r in rounds)]
    rss = result["rss"]
    lines += ["", f"Server RSS over {rss['requests']} requests: {rss['rss_before_mb']:.0f} MB before, peak "
                  f"{rss['peak_rss_mb']:.0f} MB, {rss['rss_after_mb']:.0f} MB after (growth {rss['growth_mb']:+.1f} MB), "
                  f"{rss['errors']} errors"]
    return "\n".join(lines)


def targets(result: dict) -> list[str]:
    """Issue 21's targets, PASS or MISS, each with the measured number."""
    pred = {r["row"]: r for r in result["prediction"]}
    at = {(r["batching"], r["clients"]): r for r in result["serving"]}
    most = max(c for _, c in at)
    speed = pred["ORT int8"]["predictions_per_second"] / pred["torch fp32"]["predictions_per_second"]
    drop = (pred["torch fp32"]["accuracy"] - pred["ORT int8"]["accuracy"]) * 100
    gain = statistics.median(r["ratio"] for r in result["rounds"])
    errors = sum(r["errors"] for r in result["serving"]) + result["rss"]["errors"]
    checks = [(result["max_logit_diff"] <= 1e-4, f"ORT fp32 logits within 1e-4 of torch: {result['max_logit_diff']:.2e}"),
              (speed >= 2.5 and drop <= 1, f"ORT int8 >= 2.5x torch fp32 predictions/s within 1 point: {speed:.2f}x, "
                                           f"{drop:+.2f} points behind"),
              (gain >= 3 and errors == 0, f"dynamic batching >= 3x one-at-a-time at {most} clients, 0 errors: "
                                          f"{gain:.2f}x (median of {len(result['rounds'])} rounds), {errors} errors"),
              (result["rss"]["growth_mb"] < 50, f"server RSS growth < 50 MB over {result['rss']['requests']} requests: "
                                                f"{result['rss']['growth_mb']:+.1f} MB")]
    return [("PASS  " if ok else "MISS  ") + text for ok, text in checks]


def main(argv=None) -> int:
    from benchmarks.bench import machine_info
    from tuneloop.onnx_export import export_onnx

    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    fp32_dir, int8_dir = args.work_dir / "onnx-fp32", args.work_dir / "onnx-int8"
    export_onnx(args.model_dir, str(fp32_dir), overwrite=True)
    export_onnx(args.model_dir, str(int8_dir), "int8", overwrite=True)
    prediction, diff = prediction_rows(args, fp32_dir, int8_dir)
    folder, runtime = (int8_dir, "onnx") if args.serve_runtime == "onnx" else (Path(args.model_dir), "torch")
    serving, rounds, rss = serving_rows(args, folder, runtime)
    result = {"model_dir": str(args.model_dir), "quick": args.quick, "serve_runtime": runtime,
              "serve_precision": args.serve_precision, "client": client_name(args.client), "cpus": os.cpu_count(),
              "prediction": prediction, "max_logit_diff": diff, "serving": serving, "rounds": rounds, "rss": rss,
              "machine": machine_info(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    result["targets"] = targets(result)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(tables(result) + "\n\n" + "\n".join(result["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
