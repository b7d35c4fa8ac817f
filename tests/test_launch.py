"""Launcher commands, process checks and failure reports, without starting processes."""

import json
from types import SimpleNamespace

import pytest

from tuneloop import launch
from tuneloop.cli import main
from tuneloop.config import Config, ConfigError, load_config, validate
from tuneloop.errors import TuneloopError

LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE",
              "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK",
              "TORCHELASTIC_ERROR_FILE")


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)


def _launch(**kw):
    c = Config()
    for k, v in kw.items():
        setattr(c.launch, k, v)
    validate(c)
    return c.launch


def test_one_machine_uses_a_standalone_rendezvous_on_a_free_port():
    cmd = launch.launch_command(_launch(num_processes=4), ["train", "--epochs", "1"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "1", "--standalone",
                       "-m", "tuneloop", "train", "--epochs", "1"]


def test_several_machines_meet_at_machine_0_with_the_timeout():
    la = _launch(num_processes=8, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", timeout=60)
    assert launch.torchrun_args(la) == ["--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1", "--master_addr",
                                        "10.0.0.1", "--master_port", "29500", "--rdzv_conf", "timeout=60"]


def test_accelerate_launch_counts_processes_of_all_machines(tmp_path):
    la = _launch(num_processes=8, num_machines=2, machine_rank=0, main_process_ip="10.0.0.1",
                 main_process_port=1234, accelerate_config=str(tmp_path / "fsdp.yaml"))
    cmd = launch.launch_command(la, ["train"])
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[-3:] == ["-m", "tuneloop", "train"]
    args = cmd[3:-3]
    assert dict(zip(args[::2], args[1::2])) == {
        "--config_file": str(tmp_path / "fsdp.yaml"), "--num_processes": "16", "--num_machines": "2",
        "--machine_rank": "0", "--main_process_ip": "10.0.0.1", "--main_process_port": "1234"}


@pytest.mark.parametrize("flags, fragment", [
    ({"num_machines": 2}, "launch.main_process_ip"),
    ({"num_machines": 2, "machine_rank": 2, "main_process_ip": "h"}, "launch.machine_rank: must be in 0..1"),
    ({"num_processes": 0}, "launch.num_processes: must be at least 1"),
    ({"timeout": 0}, "launch.timeout"),
    ({"main_process_port": 70000}, "launch.main_process_port"),
])
def test_launch_options_are_validated(flags, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(flags=flags)


def test_cli_flags_and_yaml_section(tmp_path, capsys):
    assert main(["train", "--num-processes", "2", "--num-machines", "2", "--machine-rank", "1",
                 "--main-process-ip", "127.0.0.1", "--main-process-port", "29555", "--timeout", "30",
                 "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "launch:\n  num_processes: 2\n  num_machines: 2\n  machine_rank: 1\n  main_process_ip: 127.0.0.1\n" \
           "  main_process_port: 29555\n  timeout: 30\n" in out
    assert main(["train", "--num-proceses", "2"]) == 2
    assert "did you mean '--num-processes'" in capsys.readouterr().err


def test_a_launched_process_does_not_launch_again(monkeypatch):
    la = _launch(num_processes=2)
    assert launch.needs_launcher(la) and not launch.needs_launcher(_launch())
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not launch.needs_launcher(la)


def _accelerator(n):
    return SimpleNamespace(num_processes=n)


def test_processes_seen_must_be_the_ones_launched_and_configured(monkeypatch):
    c = Config()
    launch.check_processes(c, _accelerator(1))
    assert (c.launch.num_processes, c.launch.num_machines) == (1, 1)  # resolved, saved with the run
    c.launch.num_processes = 2
    with pytest.raises(TuneloopError, match="Python API runs in this process only"):
        launch.check_processes(c, _accelerator(1))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(TuneloopError, match="launcher started 4 processes but Accelerate sees 1"):
        launch.check_processes(Config(), _accelerator(1))
    with pytest.raises(TuneloopError, match="launcher started 2 process.* on each of 2 machine"):
        launch.check_processes(c, _accelerator(4))
    c = Config()  # torchrun -m tuneloop: the counts come from the launcher
    launch.check_processes(c, _accelerator(4))
    assert (c.launch.num_processes, c.launch.num_machines) == (2, 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # mpirun: only the total is known
    c = load_config(flags={"num_processes": 2, "num_machines": 2, "main_process_ip": "h"})
    launch.check_processes(c, _accelerator(4))
    assert (c.launch.num_processes, c.launch.num_machines) == (2, 2)
    c.launch.num_processes = 3
    with pytest.raises(TuneloopError, match="launcher started 4 process"):
        launch.check_processes(c, _accelerator(4))


def test_errors_name_the_process_and_are_left_for_the_launcher(monkeypatch, tmp_path, capsys):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setattr("tuneloop.cli.quiet_libraries", lambda debug: None)  # process-wide; not in pytest
    assert main(["train", "--epochs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "tuneloop: error: process 1 of 2: train.epochs: must be at least 1, got 0"
    assert json.loads(error_file.read_text())["message"] == "train.epochs: must be at least 1, got 0"


def _failure(exitcode, message=None, t=0.0):
    data = {"message": message, "timestamp": int(t), "time": t} if message else {"message": "<NONE>"}  # as torch
    return SimpleNamespace(exitcode=exitcode, error_file_data=data, timestamp=int(t) + 100)


def test_the_first_reported_failure_is_the_root_cause():
    failures = {0: _failure(-15), 1: _failure(1, "peer closed", t=12.5), 2: _failure(2, "bad data", t=12.1)}
    assert launch.first_failure(failures)[0] == 2
    assert launch.first_failure({0: _failure(-15), 1: _failure(1)})[0] == 1  # exited, not stopped by the launcher
    assert launch.first_failure({0: _failure(1, t=1.0), 1: _failure(1, "bad data", t=5.0)})[0] == 1


def test_where_the_processes_meet_does_not_block_a_resume():
    from tuneloop.checkpoint import check_compatible
    from tuneloop.naming import dotted_keys

    saved = load_config(flags={"num_processes": 2, "num_machines": 2, "main_process_ip": "10.0.0.1"})
    here = load_config(flags={"num_processes": 2, "num_machines": 2, "machine_rank": 1, "main_process_ip": "10.0.0.7",
                              "main_process_port": 29400, "timeout": 60})
    record = {"data": "d", "tokenizer": "t", "num_processes": 4}
    assert check_compatible({**record, "config": dotted_keys(saved.to_dict())},
                            {**record, "config": dotted_keys(here.to_dict())}) == []
    assert check_compatible({**record, "config": dotted_keys(saved.to_dict())},
                            {**record, "num_processes": 2, "config": dotted_keys(here.to_dict())}) == [
        "number of processes 4 -> 2"]
