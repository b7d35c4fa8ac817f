"""Several processes from a notebook cell: `tuneloop.notebook_launch(config, num_processes=N)`.

The processes are forked from the notebook's kernel by Accelerate's `notebook_launcher` (torch's elastic
agent, as `torchrun` runs it), each with the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), so each runs the same `train` as `tuneloop train --num-processes N`.
GPUs and TPUs go through `notebook_launcher`. Without them it falls short: in Colab it runs the function
once in the kernel whatever `num_processes` says, elsewhere it labels CPU processes "CUDAs" and refuses to
start once bitsandbytes has been imported (a guard against CUDA initialised before forking, moot on a CPU).
There tuneloop starts the same elastic launch itself, with Accelerate's CPU (gloo) set-up in each process.

Process 0 hands its final metrics back through a file. A process that raises ends the launch: the agent
stops the others, and the cell gets one `LaunchError` naming the process and its error, never a hung
kernel (peers stuck in a collective with a dead process give up after `launch.timeout`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tuneloop.config import Config, validate
from tuneloop.errors import ConfigError, TuneloopError
from tuneloop.launch import LaunchError, check_devices

# The elastic agent's own banners and multi-line failure reports; the cell gets one exception instead.
_LAUNCHER_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing.spawn")


def notebook_launch(config: Config, num_processes: int | None = None) -> dict[str, float]:
    """Train on `num_processes` processes of this machine (default: `launch.num_processes`, else one per GPU,
    else 1) and return process 0's final evaluation metrics."""
    import torch

    from tuneloop.recipe import check_output_dir

    n = num_processes or config.launch.num_processes or max(torch.cuda.device_count(), 1)
    config = copy.deepcopy(config)  # the caller's config stays as it was, usable with train() afterwards
    config.launch.num_processes = n
    validate(config)
    if config.launch.num_machines > 1:
        raise ConfigError("launch.num_machines: notebook_launch starts the processes of this machine only; "
                          "start jobs on several machines with `tuneloop train` on each")
    check_devices(config.launch)
    check_output_dir(config)  # fail once, here, rather than in every process
    if n == 1:
        from tuneloop.recipe import train

        return train(config)
    forget_accelerate_state()
    port = config.launch.main_process_port or free_port()
    with tempfile.TemporaryDirectory(prefix="tuneloop-launch-") as tmp:
        quiet = {name: logging.getLogger(name).level for name in _LAUNCHER_LOGGERS}
        for name in quiet:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            if has_accelerators():
                from accelerate import notebook_launcher

                # Its mixed_precision argument only reaches the processes as ACCELERATE_MIXED_PRECISION, which
                # _worker drops: train.mixed_precision decides (resolving `auto` here would initialise CUDA).
                notebook_launcher(_worker, args=(config, tmp), num_processes=n, use_port=str(port),
                                  rdzv_conf={"timeout": config.launch.timeout})
            else:
                elastic_launch(_worker, (config, tmp), n, port, config.launch.timeout)
        except Exception as e:
            raise launch_error(e, Path(tmp), n) from None
        finally:
            for name, level in quiet.items():
                logging.getLogger(name).setLevel(level)
        results = Path(tmp) / "results.json"
        if not results.exists():
            raise LaunchError(f"the {n} processes ended without results from process 0", 1)
        return json.loads(results.read_text(encoding="utf-8"))


def _worker(config: Config, tmp: str) -> None:
    """One process of the launch: train, then process 0 leaves the metrics; any error is left for the cell."""
    import torch

    from tuneloop.recipe import train

    if not torch.cuda.is_available():
        # A forked process inherits the kernel's OpenMP state but not its worker threads: a parallel region
        # with more than one thread would wait for them forever. One thread each, as torchrun's default.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)  # notebook_launcher's default, not the user's choice
    import datasets
    import transformers

    # ipykernel drops widget messages sent from a forked process ("attempted to send message from fork") but
    # passes its text through: the training bar is drawn as text, the libraries' loading bars not at all.
    if "ipykernel" in sys.modules:
        import tqdm.std

        import tuneloop.loop

        tuneloop.loop.tqdm = tqdm.std.tqdm
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # process 0 speaks for all, as on the command line; errors still reach the cell
        import warnings

        warnings.filterwarnings("ignore")
        transformers.logging.set_verbosity_error()
        logging.getLogger("tuneloop").setLevel(logging.ERROR)
    try:
        results = train(config)
    except BaseException as e:
        error = {"rank": rank, "time": time.time(), "type": type(e).__name__, "message": str(e),
                 "ours": isinstance(e, TuneloopError), "traceback": traceback.format_exc()}
        (Path(tmp) / f"error-{rank}.json").write_text(json.dumps(error), encoding="utf-8")
        raise
    if rank == 0:
        path = Path(tmp) / "results.json"
        path.with_suffix(".tmp").write_text(json.dumps(results), encoding="utf-8")
        os.replace(path.with_suffix(".tmp"), path)


def launch_error(e: Exception, tmp: Path, n: int) -> Exception:
    """One exception for the cell: the first error a process raised, not the ones it caused in the others."""
    errors = [json.loads(p.read_text(encoding="utf-8")) for p in tmp.glob("error-*.json")]
    # A peer that lost its partner fails too (a broken collective): the first error is the cause.
    first = min(errors, key=lambda x: (x["type"] in ("DistBackendError", "DistNetworkError", "KeyboardInterrupt"),
                                       x["time"]), default=None)
    if first is None:
        failures = getattr(e, "failures", None)
        if not failures:  # the launcher itself refused (a device used before forking, a port in use)
            return LaunchError(f"could not start the {n} processes: {str(e).strip() or type(e).__name__}", 1)
        rank, failure = min(failures.items())
        what = f"stopped by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        return LaunchError(f"process {rank} of {n} failed: {what}", 1)
    message = first["message"] if first["ours"] else f"{first['type']}: {first['message']}"
    error = LaunchError(f"process {first['rank']} of {n} failed: {message}", 1)
    if not first["ours"] and hasattr(error, "add_note"):  # an unexpected error: keep where it happened
        error.add_note(f"traceback of process {first['rank']}:\n{first['traceback'].rstrip()}")
    return error


def forget_accelerate_state() -> None:
    """Forked processes inherit Accelerate's singletons: a `train()` run earlier in this kernel must not leak
    its single-process state into them (notebook_launcher also refuses to start with it)."""
    import torch
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if torch.cuda.is_initialized():
        raise TuneloopError("CUDA is already in use in this kernel (e.g. by tuneloop.train), so processes forked "
                            "from it cannot use the GPUs; restart the kernel and call notebook_launch first")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def has_accelerators() -> bool:
    """GPUs or TPU cores for notebook_launcher; without them the processes run on the CPU."""
    import torch

    return torch.cuda.device_count() > 0 or os.environ.get("TPU_NAME") is not None \
        or os.environ.get("PJRT_DEVICE") == "TPU"


def elastic_launch(function, args: tuple, n: int, port: int, timeout: int) -> None:
    """What notebook_launcher does with GPUs: fork n processes under torch's elastic agent."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch as launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id="none", rdzv_backend="static",
                          rdzv_endpoint=f"127.0.0.1:{port}", rdzv_configs={"rank": 0, "timeout": timeout},
                          max_restarts=0, monitor_interval=0.1, start_method="fork")
    print(f"Launching training on {n} CPU processes.")
    launch(config=config, entrypoint=function)(*args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
