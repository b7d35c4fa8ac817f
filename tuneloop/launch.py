"""Several processes and machines: start the job with an existing launcher, and check what each process sees.

`tuneloop train --num-processes N` re-runs the same command under torch.distributed's elastic launcher
(what `torchrun` runs), or under `accelerate launch` when an `accelerate config` file is given (FSDP,
DeepSpeed). Started by `torchrun -m tuneloop` or `accelerate launch -m tuneloop` directly, tuneloop
does not launch again: it reads the process count from the launcher's environment.

A failing process ends the job: the launcher stops the other processes of its machine, and the
process-group timeout (`launch.timeout`) ends processes on other machines that wait for a dead peer.
Each process reports its error in one line and records it for the launcher, which names the rank
that failed first and exits with its exit code.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

from tuneloop.config import Config, LaunchConfig
from tuneloop.errors import ConfigError, TuneloopError

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500  # torchrun's and Accelerate's default rendezvous port
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def _env_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return None


def launched_world_size() -> int | None:
    """Processes of the job when a launcher (torchrun, accelerate launch, mpirun) started this one, else None."""
    return _env_int(_WORLD_SIZE_VARS)


def process_rank() -> int:
    """This process's global rank as the launcher set it (0 without a launcher)."""
    return _env_int(_RANK_VARS) or 0


def is_main_process() -> bool:
    return process_rank() == 0


def total_processes(launch: LaunchConfig) -> int:
    return (launch.num_processes or 1) * launch.num_machines


def needs_launcher(launch: LaunchConfig) -> bool:
    """True when the config asks for several processes and no launcher has started this one."""
    return launched_world_size() is None and total_processes(launch) > 1


def torchrun_args(launch: LaunchConfig) -> list[str]:
    """torch.distributed.run options for the configured processes and machines."""
    args = ["--nproc_per_node", str(launch.num_processes or 1), "--nnodes", str(launch.num_machines)]
    if launch.num_machines > 1 or launch.main_process_port:
        # Static rendezvous on machine 0: every machine names it and its own rank.
        args += ["--node_rank", str(launch.machine_rank), "--master_addr", launch.main_process_ip or "127.0.0.1",
                 "--master_port", str(launch.main_process_port or DEFAULT_PORT),
                 "--rdzv_conf", f"timeout={launch.timeout}"]
    else:
        args += ["--standalone"]  # one machine: a free port is picked, parallel jobs do not collide
    return args


def accelerate_launch_args(launch: LaunchConfig) -> list[str]:
    """`accelerate launch` options; its --num_processes counts the processes of all machines."""
    args = ["--config_file", str(launch.accelerate_config), "--num_processes", str(total_processes(launch)),
            "--num_machines", str(launch.num_machines), "--machine_rank", str(launch.machine_rank)]
    if launch.main_process_ip:
        args += ["--main_process_ip", launch.main_process_ip]
    if launch.main_process_port or launch.num_machines > 1:
        args += ["--main_process_port", str(launch.main_process_port or DEFAULT_PORT)]
    return args


def launch_command(launch: LaunchConfig, argv: list[str]) -> list[str]:
    """The command each machine runs, as the user could type it."""
    if launch.accelerate_config:
        return [sys.executable, "-m", "accelerate.commands.launch", *accelerate_launch_args(launch),
                "-m", "tuneloop", *argv]
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(launch), "-m", "tuneloop", *argv]


def start(config: Config, argv: list[str], debug: bool = False) -> int:
    """Run `tuneloop <argv>` in every process of this machine; the job's exit code."""
    launch = config.launch
    check_devices(launch)
    command = launch_command(launch, argv)
    if debug:
        log.info("launching: %s", " ".join(command))
    if launch.accelerate_config:
        return subprocess.run(command).returncode
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    if not debug:  # the launcher's own banners and failure reports; ours is one line below
        for name in ("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.launcher"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(command[3:]))
    except ChildFailedError as e:
        rank, failure = first_failure(e.failures)
        what = failure.message if _reported(failure) else (
            f"stopped by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}")
        raise LaunchError(f"process {rank} of {total_processes(launch)} failed: {what}",
                          failure.exitcode if failure.exitcode > 0 else 1) from None
    except (DistError, RendezvousError) as e:  # the machines never met: wrong address, port or machine count
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LaunchError(f"the {launch.num_machines} machines did not all join at "
                          f"{launch.main_process_ip or 'localhost'}:{launch.main_process_port or DEFAULT_PORT} "
                          f"within launch.timeout={launch.timeout} s: {first}", 1) from None
    return 0


def check_devices(launch: LaunchConfig) -> None:
    """One process per GPU: NCCL refuses two processes on one device, after a slow start."""
    import torch

    if torch.cuda.is_available() and (launch.num_processes or 1) > torch.cuda.device_count():
        raise ConfigError(f"launch.num_processes={launch.num_processes} but this machine has "
                            f"{torch.cuda.device_count()} GPU(s); start one process per GPU")


def _reported(failure) -> bool:
    """Whether the process left its error (torch marks a missing error file '<NONE>')."""
    data = failure.error_file_data
    return isinstance(data, dict) and data.get("message") not in (None, "<NONE>")


def first_failure(failures: dict[int, Any]) -> tuple[int, Any]:
    """The root cause: a process that reported an error, earliest first; not one the launcher stopped."""
    def key(item):
        rank, f = item
        return (f.exitcode < 0, not _reported(f), f.error_file_data.get("time", f.timestamp), rank)

    return min(failures.items(), key=key)


class LaunchError(TuneloopError):
    """A process of a launched job failed; its exit code becomes the job's."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def error_prefix() -> str:
    """'process 1 of 2: ' inside a job of several processes, so the user knows which one failed."""
    world = launched_world_size()
    return f"process {process_rank()} of {world}: " if world and world > 1 else ""


def record_error(message: str) -> None:
    """Leave this process's one-line error where the elastic launcher looks for it (TORCHELASTIC_ERROR_FILE)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"message": message, "timestamp": int(time.time()), "time": time.time()}, fh)
    except OSError:
        pass


def accelerator_kwargs(config: Config) -> dict[str, Any]:
    """Accelerator arguments for the processes and machines: device choice and the process-group timeout."""
    from datetime import timedelta

    import torch
    from accelerate.utils import InitProcessGroupKwargs

    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=config.launch.timeout))
    kwargs: dict[str, Any] = {"kwargs_handlers": [timeout]}
    world = launched_world_size()
    if world and world > 1 and not torch.accelerator.is_available():
        # Without cpu=True, Accelerate leaves each CPU process of a torchrun job on its own: N separate
        # runs writing the same files. With it, the processes join one gloo process group.
        kwargs["cpu"] = True
    return kwargs


def check_processes(config: Config, accelerator) -> None:
    """The processes Accelerate sees must be the ones launched and the ones configured; record them."""
    launch = config.launch
    world = launched_world_size() or 1
    if accelerator.num_processes != world:
        raise TuneloopError(f"the launcher started {world} processes but Accelerate sees {accelerator.num_processes}; "
                            f"each would train alone")
    if launched_world_size() is None and total_processes(launch) > 1:
        raise TuneloopError(f"launch.num_processes={launch.num_processes} x num_machines={launch.num_machines}: "
                            f"start the job with `tuneloop train --num-processes N`, torchrun or accelerate launch; "
                            f"the Python API runs in this process only: use tuneloop.notebook_launch(config, "
                            f"num_processes=N) to start several from Python")
    n = accelerator.num_processes
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit():  # torchrun and accelerate launch say how many processes each machine runs
        per_machine, machines = int(local), max(n // int(local), 1)
        agrees = (launch.num_processes, launch.num_machines) == (per_machine, machines)
    else:  # mpirun, DeepSpeed's pdsh: only the total is known
        agrees = total_processes(launch) == n
        given = agrees and launch.num_processes is not None
        per_machine, machines = (launch.num_processes, launch.num_machines) if given else (n, 1)
    if launch.num_processes is not None and not agrees:
        raise TuneloopError(f"launch.num_processes={launch.num_processes}, num_machines={launch.num_machines} but the "
                            f"launcher started {per_machine} process(es) on each of {machines} machine(s)")
    # The resolved counts are saved with the run's config: a checkpoint resumes with the same processes.
    launch.num_processes, launch.num_machines = per_machine, machines
