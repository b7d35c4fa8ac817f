"""Search: a study in SQLite that survives a kill, workers sharing it, pruning, best_config.yaml that trains."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, tiny_args
from tuneloop.cli import main

optuna = pytest.importorskip("optuna")

SPACE = {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
         "train.batch_size": [8, 16], "warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2}}


def search_args(model, data, out, space, *extra):
    args = tiny_args(model, data, out, "--epochs", "2", "--max-train-samples", "24", "--max-eval-samples", "16",
                     "--report-to", "none", "--checkpoint-every-epoch", "false", "--search-space", str(space), *extra)
    return ["search", *args[1:]]


def tuneloop(args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "tuneloop", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def trials(storage, name="tuneloop"):
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def test_killed_search_resumes_and_two_workers_share_the_study(tiny_model_dir, mrpc_slice, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    out = tmp_path / "search"
    storage = f"sqlite:///{out / 'study.db'}"
    args = search_args(tiny_model_dir, mrpc_slice, out, space, "--n-trials", "4")
    first = tuneloop(args)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it in the middle: after one finished trial, during the next
        if (out / "study.db").exists() and (out / "trial-0001").exists():
            break
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    before = trials(storage)
    assert [t.state.name for t in before][0] == "COMPLETE" and len(before) == 2 and before[1].state.name == "RUNNING"

    # The same command, twice at once: both continue the one study, each running its own trials.
    workers = [tuneloop(args), tuneloop(args)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    after = trials(storage)
    assert len(optuna.get_all_study_names(storage)) == 1
    assert after[0].datetime_start == before[0].datetime_start  # the same study, not a new one
    finished = [t for t in after if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]
    assert 4 <= len(finished) <= 6  # each worker stops once the study holds 4; both may finish one last trial
    numbers = [t.number for t in after]
    assert numbers == list(range(len(after)))  # distinct trial numbers, none run twice
    new = after[2:]
    assert len({t.user_attrs["worker"] for t in new}) == 2  # both workers took trials
    assert len({t.user_attrs["run_dir"] for t in after}) == len(after)
    # Every complete trial's run folder is kept. (Once its heartbeat is 3 min old, the killed trial is failed
    # and retried by a worker, which on a slow machine happens within this test.)
    assert all((out / f"trial-{t.number:04d}" / "eval_results.json").exists() for t in after if t.state.name == "COMPLETE")

    table = (out / "trials.csv").read_text().splitlines()
    assert table[0].startswith("number,f1,") and len(table) == len(after) + 1
    assert (out / "optimization_history.png").read_bytes()[:4] == b"\x89PNG"
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    best_trial = max((t for t in after if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert best["optim"]["learning_rate"] == best_trial.params["optim.learning_rate"]
    assert best["train"]["batch_size"] == best_trial.params["train.batch_size"]
    assert best["data"]["max_train_samples"] == 24 and best["output"]["output_dir"] == str(out / "best")

    # best_config.yaml trains as it is.
    assert main(["train", "--config", str(out / "best_config.yaml")]) == 0
    assert (out / "best" / "model" / "model.safetensors").exists()
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "optimization history" in html and f"trial-{best_trial.number:04d}" in html


ASK_AT = """
import sys, time, warnings
import optuna
from tuneloop.search import open_storage
warnings.simplefilter("ignore")
study = optuna.load_study(study_name="s", storage=open_storage(sys.argv[1]))
while time.time() < float(sys.argv[2]):
    pass
print(study.ask().number)
"""


def test_workers_starting_at_once_never_take_the_same_queued_trial(tmp_path):
    # SQLite ignores Optuna's SELECT ... FOR UPDATE: without the queue lock, 4 processes asking at one instant
    # all took the one queued trial (10 of 10 tries); a retry of a killed trial is such a queued trial.
    url = f"sqlite:///{tmp_path / 'study.db'}"
    from tuneloop.search import open_storage

    optuna.create_study(study_name="s", storage=open_storage(url)).enqueue_trial({"x": 1})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.time() + 15  # after every process has imported optuna and opened the storage
    procs = [subprocess.Popen([sys.executable, "-c", ASK_AT, url, str(start)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-500:] for _, err in outputs]
    assert sorted(int(out) for out, _ in outputs) == [0, 1, 2, 3]  # one took the queued trial 0, the rest new ones
    assert [t.state.name for t in trials(url, "s")] == ["RUNNING"] * 4


def test_pruning_stops_a_weak_trial(tiny_model_dir, mrpc_slice, tmp_path, capsys):
    out = tmp_path / "search"
    out.mkdir()
    storage = f"sqlite:///{out / 'study.db'}"
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3}}))
    # Two earlier trials that scored a perfect f1 after every epoch: any real trial is below their median.
    study = optuna.create_study(storage=storage, study_name="tuneloop", direction="maximize")
    dist = {"optim.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-3)}
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(params={"optim.learning_rate": 5e-4}, distributions=dist, value=1.0,
                                                  intermediate_values={1: 1.0, 2: 1.0}))
    assert main(search_args(tiny_model_dir, mrpc_slice, out, space, "--n-trials", "3")) == 0
    pruned = trials(storage)[2]
    assert pruned.state.name == "PRUNED" and list(pruned.intermediate_values) == [1]
    records = (out / "trial-0002" / "metrics.jsonl").read_text()
    assert records.count('"type": "eval"') == 1  # stopped after its first epoch of two
    assert not (out / "trial-0002" / "model").exists()
    assert "1 pruned" in capsys.readouterr().out


def test_bad_search_inputs_are_one_line(tiny_model_dir, mrpc_slice, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"lerning_rate": {"type": "float", "low": 1e-5, "high": 1e-4, "log": True}}))
    assert main(search_args(tiny_model_dir, mrpc_slice, tmp_path / "s", space)) == 2
    assert capsys.readouterr().err.strip() == (f"tuneloop: error: search space {space}: unknown parameter 'lerning_rate' "
                                               f"(did you mean 'learning_rate'?)")
    space.write_text(yaml.safe_dump({"peft.r": [4, 8]}))  # LoRA's rank is searchable once the config has it
    assert main(search_args(tiny_model_dir, mrpc_slice, tmp_path / "s", space)) == 2
    assert "unknown parameter 'peft.r'" in capsys.readouterr().err
    space.write_text(yaml.safe_dump(SPACE))
    bad = "sqlite:////nonexistent-folder/deeper/study.db"
    assert main(search_args(tiny_model_dir, mrpc_slice, tmp_path / "s", space, "--storage", bad)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tuneloop: error: --storage {bad}: cannot open the study storage: ") and "\n" not in err
    assert main(search_args(tiny_model_dir, mrpc_slice, tmp_path / "s", space, "--storage",
                            "postgresql://user:secret@127.0.0.1:1/db")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuneloop: error: --storage postgresql://user:***@127.0.0.1:1/db: ") and "secret" not in err


def test_failed_trials_are_recorded_and_the_study_goes_on(tiny_model_dir, mrpc_slice, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"warmup_ratio": {"type": "float", "low": 1.0, "high": 2.0}}))  # always invalid
    out = tmp_path / "s"
    assert main(search_args(tiny_model_dir, mrpc_slice, out, space, "--n-trials", "2")) == 1
    failed = trials(f"sqlite:///{out / 'study.db'}")
    assert [t.state.name for t in failed] == ["FAIL", "FAIL"]  # the first failure did not stop the study
    assert all(t.user_attrs["error"].startswith("ConfigError: optim.warmup_ratio: must be in [0, 1)") for t in failed)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tuneloop: error: no trial of study 'tuneloop' completed; first error: ConfigError: ")
    assert "Traceback" not in "\n".join(err)
    assert "error" in (out / "trials.csv").read_text().splitlines()[0].split(",")


def test_search_killed_at_random_moments_ends_with_three_finished_trials(tiny_model_dir, mrpc_slice, tmp_path):
    import random

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    out = tmp_path / "search"
    storage = f"sqlite:///{out / 'study.db'}"
    args = search_args(tiny_model_dir, mrpc_slice, out, space, "--n-trials", "3", "--epochs", "1", "--pruner", "none")
    rng = random.Random(3)
    for _ in range(2):  # kill -9 at a random moment once the study exists
        proc = tuneloop(args)
        deadline = time.time() + 120
        while not (out / "study.db").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(1.0, 8.0))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    proc = tuneloop(args)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    after = trials(storage)
    interrupted = [t for t in after if t.user_attrs.get("interrupted")]
    finished = [t for t in after if t.state.name in ("COMPLETE", "PRUNED", "FAIL") and t not in interrupted]
    assert len(finished) == 3 and all(t.state.name == "COMPLETE" for t in finished), [(t.number, t.state) for t in after]
    assert all(t.state.name == "FAIL" for t in interrupted)  # a killed trial is failed at the next start...
    retried = {t.user_attrs.get("retry_of") for t in after}
    assert all(t.number in retried for t in interrupted)  # ...and run again with its parameters
    run_dirs = [t.user_attrs["run_dir"] for t in after if "run_dir" in t.user_attrs]
    assert len(set(run_dirs)) == len(run_dirs)  # no trial folder used twice
    assert all(t.user_attrs["run_dir"] == str(out / f"trial-{t.number:04d}") for t in after if "run_dir" in t.user_attrs)
    assert all((out / f"trial-{t.number:04d}" / "eval_results.json").exists() for t in finished)
    assert len((out / "trials.csv").read_text().splitlines()) == len(after) + 1


def test_a_setting_given_on_the_command_line_is_never_silently_resampled(tuneloop_log):
    caplog = tuneloop_log
    """Before: `tuneloop search --learning-rate 1e-4` sampled learning_rate anyway (the built-in space has it)."""
    from tuneloop.config import Config
    from tuneloop.errors import ConfigError
    from tuneloop.search import DEFAULT_SPACE, load_space, respect_given

    base = Config.from_flags(learning_rate=1e-4, epochs=2)
    space = respect_given(load_space(None), base, None)
    assert set(space) == set(DEFAULT_SPACE) - {"optim.learning_rate", "train.epochs"}
    assert "search: optim.learning_rate stays at 0.0001 as you set it" in caplog.text
    caplog.clear()
    # Their own space names it: the space wins, and says so.
    assert "optim.learning_rate" in respect_given(dict(DEFAULT_SPACE), base, "space.yaml")
    assert "optim.learning_rate is sampled from the search space space.yaml, so your setting 0.0001" in caplog.text
    for flags, message in (({"resume": "latest"}, "checkpoint.resume: does not apply to tuneloop search"),
                           ({"push_to_hub": "me/model"}, "output.push_to_hub: does not apply")):
        with pytest.raises(ConfigError, match=message):
            respect_given(load_space(None), Config.from_flags(**flags), None)
    # The recipe's values are not the user's: --config fast's learning rate is still searched.
    assert "optim.learning_rate" in respect_given(load_space(None), Config.from_flags("fast"), None)
