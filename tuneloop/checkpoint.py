"""Crash-consistent checkpoints and exact resume.

A checkpoint is `OUT/checkpoints/step-000123/`: Accelerate's `save_state` (model, optimizer, scaler,
every process's RNG states) plus `training_state.json` (the loop's counters), the learning-rate
schedule and AdaLoRA's rank budget (`<name>.json` + `<name>.safetensors`), `config.yaml` and
`fingerprint.json` (data, tokenizer, model, settings).

Nothing in a checkpoint is unpickled with `weights_only=False`, so a checkpoint folder from someone else
cannot run code on `--resume` (the manifest's checksums prove integrity, not origin). Accelerate pickles
registered custom objects and loads them with `weights_only=False`, so tuneloop registers none: its own
states are JSON and safetensors; the model is safetensors; the optimizer, scaler and RNG states are
loaded by Accelerate with `weights_only=True` (plain tensors and numbers only), and a file that holds
anything else ends the resume with one line instead of running it. It is written into a
temporary folder, every file is fsynced, `manifest.json` with each file's SHA-256 is written last,
and the folder is renamed into place. A folder without a valid manifest is not a checkpoint: resume
skips it with a warning and falls back to the previous good one. Older checkpoints are deleted only
after their successor is complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from tuneloop.errors import TuneloopError
from tuneloop.naming import dotted_keys

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_FILE = "training_state.json"
FINGERPRINT_FILE = "fingerprint.json"

# Settings that may change between an interrupted run and its resume without breaking exactness.
RESUME_SAFE = {"output.output_dir", "output.overwrite", "checkpoint.resume", "checkpoint.resume_force",
               "checkpoint.keep_last", "checkpoint.keep_best", "checkpoint.checkpoint_every",
               "checkpoint.checkpoint_every_epoch", "train.log_every", "peft.merge_adapter", "eval.eval_batch_size", "data.cache_dir",
               # Where and how the processes meet; their number is compared as num_processes.
               "launch.num_processes", "launch.num_machines", "launch.machine_rank", "launch.main_process_ip",
               "launch.main_process_port", "launch.timeout", "launch.accelerate_config"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def fingerprint(run) -> dict[str, Any]:
    """What must match for a resume to be exact: data content, tokenizer, model, settings."""
    from tuneloop.data import tokenizer_fingerprint

    return {
        "data": run.raw.fingerprint(),
        "tokenizer": tokenizer_fingerprint(run.tokenizer),
        "num_processes": run.accelerator.num_processes,
        "config": dotted_keys(run.config.to_dict()),
    }


def _encode(value: Any, tensors: dict[str, Any], key: str) -> Any:
    """A state dict as JSON, each tensor replaced by a reference into `tensors` (saved as safetensors)."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key, "device": value.device.type}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"state key {key!r}: only string keys can be saved as JSON")
        return {k: _encode(v, tensors, f"{key}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"state key {key!r}: {type(value).__name__} cannot be saved as JSON or safetensors")


def _decode(value: Any, tensors: dict[str, Any], device) -> Any:
    if isinstance(value, dict) and "__tensor__" in value:
        tensor = tensors[value["__tensor__"]]
        return tensor if value.get("device", "cpu") == "cpu" else tensor.to(device)
    if isinstance(value, dict):
        return {k: _decode(v, tensors, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors, device) for v in value]
    return value


def checkpointed_states(run) -> dict[str, Any]:
    """tuneloop's own objects whose state a checkpoint holds beside Accelerate's (name -> object)."""
    states = {"scheduler": run.scheduler}
    if getattr(run, "rank_budget", None) is not None:
        states["adalora_budget"] = run.rank_budget
    return states


def save_states(run, folder: Path) -> None:
    """Each checkpointed state as `<name>.json`, its tensors (if any) as `<name>.safetensors`: no pickle."""
    from safetensors.torch import save_file

    for name, obj in checkpointed_states(run).items():
        tensors: dict[str, Any] = {}
        _write_json(folder / f"{name}.json", _encode(obj.state_dict(), tensors, name))
        if tensors:
            save_file(tensors, str(folder / f"{name}.safetensors"))


def load_states(run, folder: Path) -> None:
    from safetensors.torch import load_file

    for name, obj in checkpointed_states(run).items():
        path = folder / f"{name}.json"
        if not path.is_file():
            raise TuneloopError(f"cannot resume from {folder}: it has no {path.name} (a checkpoint of an older tuneloop, "
                                f"which pickled it; checkpoints are no longer unpickled): start the run again")
        tensor_file = folder / f"{name}.safetensors"
        tensors = load_file(str(tensor_file), device="cpu") if tensor_file.is_file() else {}
        obj.load_state_dict(_decode(json.loads(path.read_text(encoding="utf-8")), tensors, run.accelerator.device))


def load_accelerate_state(run, path: Path) -> None:
    """Accelerate's part (model, optimizer, scaler, RNG), every pickle loaded with weights_only=True."""
    import pickle

    from accelerate.utils import load as accelerate_load

    pickled = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
    if pickled:  # Accelerate would unpickle these with weights_only=False (and refuses them when none is registered)
        raise TuneloopError(f"cannot resume from {path}: it holds {', '.join(pickled)}, pickled state that tuneloop "
                            f"does not load (a checkpoint of an older tuneloop, or not of tuneloop): start the run again")
    # Accelerate swallows any error loading the RNG states (the resume would silently stop being exact): try it first.
    rng = path / f"random_states_{run.accelerator.process_index}.pkl"
    try:
        if rng.is_file():
            accelerate_load(rng, weights_only=True)
        # Adapter runs checkpoint only what trains; the frozen base comes from its source as at the start.
        run.accelerator.load_state(str(path), load_kwargs={"weights_only": True},
                                   strict=run.config.peft.method == "none")
    except pickle.UnpicklingError as e:
        raise TuneloopError(f"cannot resume from {path}: a file in it holds more than tensors and numbers, and "
                            f"tuneloop does not unpickle code from a checkpoint ({str(e).splitlines()[0][:200]})") from None


def save_checkpoint(run, metric: float | None = None) -> Path:
    """Save the full training state at an optimizer-step boundary. Called on every process."""
    accelerator, state = run.accelerator, run.state
    root = checkpoints_dir(run.config.output.output_dir)
    name = f"step-{state.step:06d}"
    final, tmp = root / name, root / f".tmp-{name}"
    started = time.perf_counter()
    accelerator.wait_for_everyone()
    error: OSError | None = None
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
    except OSError as e:
        error = e
    accelerator.wait_for_everyone()
    size = 0
    if accelerator.is_main_process:
        try:
            if error is not None:
                raise error
            _write_json(tmp / STATE_FILE, {**state.state_dict(), "metric": metric, "main_metric": run.main_metric})
            _write_json(tmp / FINGERPRINT_FILE, fingerprint(run))
            save_states(run, tmp)
            (tmp / "config.yaml").write_text(run.config.to_yaml(), encoding="utf-8")
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            for p in files:
                _fsync_file(p)
            manifest = {"step": state.step, "files": {str(p.relative_to(tmp)): _sha256(p) for p in files}}
            size = sum(p.stat().st_size for p in files)
            _write_json(tmp / MANIFEST, manifest)  # last: its presence means the checkpoint is complete
            _fsync_dir(tmp)
            if final.exists():  # a leftover from a run that died after this step; ours is newer
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise TuneloopError(f"cannot write checkpoint {final}: {reason}; earlier checkpoints are intact") from None
        apply_retention(root, run.config.checkpoint.keep_last, run.config.checkpoint.keep_best)
        run.log({"type": "checkpoint", "step": state.step, "path": str(final),
                 "save_seconds": round(time.perf_counter() - started, 3), "size_mb": round(size / 2**20, 2)})
    elif error is not None:
        raise TuneloopError(f"cannot write checkpoint {final}: {error.strerror or error}") from None
    accelerator.wait_for_everyone()
    return final


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint's training state if its manifest and every checksum hold, else None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        for rel, digest in manifest["files"].items():
            if _sha256(path / rel) != digest:
                log.warning("checkpoint %s is corrupted (%s does not match its checksum); skipping it", path, rel)
                return None
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        log.warning("checkpoint %s is incomplete (%s missing); skipping it", path, Path(e.filename or "").name)
    except (OSError, ValueError, KeyError) as e:
        log.warning("checkpoint %s is unreadable (%s); skipping it", path, e)
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoints (a manifest exists) by recorded step, newest first. Not verified."""
    found = []
    if not root.is_dir():
        return found
    for p in root.iterdir():
        if p.name.startswith(".") or not p.is_dir():
            continue
        try:
            found.append((int(json.loads((p / MANIFEST).read_text())["step"]), p))
        except (OSError, ValueError, KeyError):
            found.append((-1, p))  # incomplete: sorts last, verified (and rejected) only if reached
    return sorted(found, key=lambda t: t[0], reverse=True)


def latest_checkpoint(run) -> Path | None:
    steps = [p for step, p in list_checkpoints(checkpoints_dir(run.config.output.output_dir)) if step >= 0]
    return steps[0] if steps else None


def find_resume_checkpoint(output_dir: str | Path, requested: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from: a given folder, or the newest one that verifies."""
    if requested not in ("latest", "true", "True"):
        path = Path(requested)
        record = read_checkpoint(path) if path.is_dir() else None
        if record is None:
            raise TuneloopError(f"cannot resume from {path}: not a complete, intact checkpoint")
        return path, record
    root = checkpoints_dir(output_dir)
    found = list_checkpoints(root)
    for step, path in found:
        if step < 0:
            log.warning("checkpoint %s is incomplete (no valid manifest); skipping it", path)
    for step, path in found:
        if step < 0:
            continue
        record = read_checkpoint(path)
        if record is not None:
            return path, record
    raise TuneloopError(f"no complete checkpoint to resume from in {root}")


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Every difference that would make the resumed run differ from an uninterrupted one."""
    changes = []
    if saved["data"] != current["data"]:
        changes.append("the data changed (content fingerprint differs)")
    if saved["tokenizer"] != current["tokenizer"]:
        changes.append("the tokenizer changed")
    if saved["num_processes"] != current["num_processes"]:
        changes.append(f"number of processes {saved['num_processes']} -> {current['num_processes']}")
    for key in sorted(set(saved["config"]) | set(current["config"])):
        if key in RESUME_SAFE:
            continue
        old, new = saved["config"].get(key), current["config"].get(key)
        if old != new:
            changes.append(f"{key} {old!r} -> {new!r}")
    return changes


def apply_retention(root: Path, keep_last: int, keep_best: bool) -> None:
    """Keep the newest `keep_last` checkpoints and the best one by the task metric; delete the rest."""
    complete = [(step, p) for step, p in list_checkpoints(root) if step >= 0]
    keep = {p for _, p in complete[:keep_last]}
    if keep_best:
        best, best_path = None, None
        for _, p in reversed(complete):  # oldest first: on a tie the earlier one is best, as in the loop's best_step
            try:
                metric = json.loads((p / STATE_FILE).read_text()).get("metric")
            except (OSError, ValueError):
                continue
            if metric is not None and (best is None or metric > best):
                best, best_path = metric, p
        if best_path is not None:
            keep.add(best_path)
    for _, p in complete:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():  # temporary folders of saves that died
        if p.name.startswith(".tmp-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def resume(run, requested: str, force: bool) -> Path:
    """Restore every state from the checkpoint; refuse settings that break exactness unless forced."""
    path, record = find_resume_checkpoint(run.config.output.output_dir, requested)
    saved = json.loads((path / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    changes = check_compatible(saved, fingerprint(run))
    if changes and not force:
        raise TuneloopError(f"cannot resume exactly from {path}: " + "; ".join(changes)
                            + " (pass --resume-force to resume anyway)")
    load_accelerate_state(run, path)
    load_states(run, path)
    run.state.load_state_dict({k: v for k, v in record.items() if k not in ("metric", "main_metric")})
    truncate_log(run.log, run.state.step)
    if changes:
        log.warning("resuming with changed settings: %s", "; ".join(changes))
    run.log({"type": "resume", "step": run.state.step, "path": str(path), "forced_changes": changes})
    return path


def truncate_log(metrics_log, step: int) -> None:
    """Drop records logged after the checkpoint, so the resumed log has no duplicate or missing step."""
    if not getattr(metrics_log, "enabled", False) or not metrics_log.path.exists():
        return
    kept = []
    for line in metrics_log.path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by the crash
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = metrics_log.path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, metrics_log.path)
