#!/usr/bin/env bash
# The GPU check: on one CUDA GPU with no network, in at most 8 minutes, the GPU tests and the benchmark rows
# the issue's GPU targets are stated in, then one table. Run from the project root after the kit is set up:
#     source .gpu-kit/setup.sh && bash benchmarks/gpu_check.sh            # results in ${OUT:-gpu-check}/
#     SMOKE=1 bash benchmarks/gpu_check.sh   # any machine, CPU too: every stage on 32 examples and a tiny "large"
#                                            # model (also the compiled stage's), to prove the script end to end
#                                            # (numbers mean nothing); a CPU is slow, so SMOKE gives every stage
#                                            # SCALE (default 8) times its limit and the whole check BUDGET 4800 s
# Stages (each with its own time limit; a stage that fails is reported and the next one still runs):
#   1. tests/test_gpu.py (and test_loop.py's host-read count)
#   2. bench rows a-d on all-MiniLM-L6-v2, full MRPC, 3 epochs
#   3. bench rows a-c on a BERT-base-sized model (random weights from BertConfig(), the default model's
#      tokenizer: speed does not depend on the weights), 1 epoch
#   4. bench row g (row c with torch.compile + CUDA graphs) on MiniLM, 1 epoch, if time is left
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check}
WORK=${WORK:-/tmp/tuneloop-gpu-check}
if [[ -n "${SMOKE:-}" ]]; then BUDGET=${BUDGET:-4800}; SCALE=${SCALE:-8}; else BUDGET=${BUDGET:-480}; SCALE=${SCALE:-1}; fi
mkdir -p "$OUT" "$WORK"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
status=0
stage() {  # stage NAME MAX_SECONDS COMMAND...: run with the smaller of its limit and the time left
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local t; t=$(left); (( t < limit )) && limit=$t
  if (( limit < 20 )); then echo "gpu_check: $name skipped: no time left" | tee -a "$OUT/summary.txt"; status=1; return; fi
  echo "gpu_check: $name (up to ${limit} s): $*"
  local s; s=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "gpu_check: $name exit $rc after $(( $(date +%s) - s )) s (log: $OUT/$name.log)" | tee -a "$OUT/summary.txt"
  (( rc == 0 )) || status=1
  tail -n 3 "$OUT/$name.log"
}
: > "$OUT/summary.txt"; rm -f "$OUT"/{minilm,bert-base,compiled}.json  # never report an earlier run's rows
$PY -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (no CUDA)')" \
  | tee -a "$OUT/summary.txt"

if [[ -n "${SMOKE:-}" ]]; then
  SIZE=(--max-train-samples 32 --epochs 1); LARGE_CONFIG="hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128"
else
  SIZE=(); LARGE_CONFIG=""
fi
LARGE="$WORK/bert-base-random"
$PY - "$LARGE" "$LARGE_CONFIG" <<'PY' || { echo "gpu_check: cannot build the BERT-base-sized model"; exit 1; }
import sys, torch
from pathlib import Path
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
from tuneloop.model import default_model_path
path, extra = Path(sys.argv[1]), sys.argv[2]
if not (path / "config.json").is_file():
    torch.manual_seed(0)
    config = eval(f"BertConfig({extra})")  # BertConfig(): BERT-base (12 x 768); SMOKE: a tiny one
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(path)
print("large model:", path)
PY

stage tests 150 $PY -m pytest -q -x tests/test_gpu.py tests/test_loop.py
stage minilm 230 $PY benchmarks/bench.py --rows a,b,c,d "${SIZE[@]}" --work-dir "$WORK/minilm" --out "$OUT/minilm.json"
[[ -n "${SMOKE:-}" ]] && LARGE_SIZE=("${SIZE[@]}") || LARGE_SIZE=(--epochs 1)
stage bert-base 150 $PY benchmarks/bench.py --rows a,b,c "${LARGE_SIZE[@]}" --model "$LARGE" --work-dir "$WORK/bert-base" \
  --out "$OUT/bert-base.json"
# SMOKE: the tiny model, whose graphs Inductor compiles in seconds on a CPU (MiniLM's took over 120 s there).
[[ -n "${SMOKE:-}" ]] && G_SIZE=("${SIZE[@]}" --model "$LARGE") || G_SIZE=(--epochs 1)
stage compiled 120 $PY benchmarks/bench.py --rows g "${G_SIZE[@]}" --work-dir "$WORK/compiled" --out "$OUT/compiled.json"

$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = ["| model | row | samples/s | train s | ms/step | wall s | dev acc / F1 | MFU (peak) |", "|---|---|---:|---:|---:|---:|---|---:|"]
ratios, device = {}, None
for name in ("minilm", "bert-base", "compiled"):
    f = out / f"{name}.json"
    if not f.exists():
        lines.append(f"| {name} | (no result) | | | | | | |")
        continue
    r = json.loads(f.read_text())
    device = r.get("device", device)
    for row, s in r["summary"].items():
        if not s.get("runs_ok"):
            lines.append(f"| {name} | {row} failed | | | | | | |")
            continue
        lines.append(f"| {name} | {row} | {s['samples_per_second']:.1f} | {s['train_seconds']:.1f} | "
                     f"{1000 * s['seconds_per_step']:.1f} | {s['wall_seconds']:.1f} | {s['accuracy']:.3f} / {s['f1']:.3f} | "
                     f"{100 * s['mfu']:.1f}% ({s['precision']}) |")
    ratios[name] = {k: round(v, 3) for k, v in r["ratios"].items()}
    ratios[name]["summary"] = r["summary"]
print(f"\nDevice: {device}\n")
print("\n".join(lines))
m, b = ratios.get("minilm", {}), ratios.get("bert-base", {})
def sps(res, row):
    return res.get("summary", {}).get(row, {}).get("samples_per_second")
checks = []
if sps(m, "a") and sps(m, "c"):
    checks.append(("MiniLM c >= 1.5x a samples/s", sps(m, "c") / sps(m, "a"), 1.5, ">="))
if sps(m, "b") and sps(m, "c"):
    checks.append(("MiniLM c >= 1.5x b samples/s", sps(m, "c") / sps(m, "b"), 1.5, ">="))
if "d_over_a_wall_seconds" in m:
    checks.append(("MiniLM d wall <= 35% of a", m["d_over_a_wall_seconds"], 0.35, "<="))
if sps(b, "a") and sps(b, "c"):
    checks.append(("BERT-base c >= 2x a samples/s", sps(b, "c") / sps(b, "a"), 2.0, ">="))
g = ratios.get("compiled", {})
if sps(g, "g") and sps(m, "c"):
    print(f"\ncompiled (g, 1 epoch) over eager (c) samples/s on MiniLM: {sps(g, 'g') / sps(m, 'c'):.2f}")
print()
for text, value, target, op in checks:
    ok = value >= target if op == ">=" else value <= target
    print(f"- {'PASS' if ok else 'FAIL'}  {text}: {value:.2f} (target {op} {target})")
PY
cat "$OUT/summary.txt"
echo "gpu_check: done in $(( $(date +%s) - START )) s; exit $status"
exit $status
