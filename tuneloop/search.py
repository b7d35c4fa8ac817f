"""`tuneloop search`: hyperparameter search with Optuna, over the same `train` as `tuneloop train`.

Each trial builds a Config from the fixed settings (every train flag) plus the sampled values and trains
into `OUT/trial-NNNN/`. Its per-epoch scores on the main metric go to `trial.report` through one hook on
the run's log, where `trial.should_prune` may stop it. The study lives in an Optuna storage (SQLite in
the output folder by default): a killed search resumes with the same command, and several workers (also
on several machines, with a shared RDB URL) run distinct trials of one study.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import socket
import warnings
from pathlib import Path
from typing import Any

from tuneloop import atomic
from tuneloop.config import Config, config_from_dict, field_paths, short_names
from tuneloop.errors import ConfigError, TuneloopError
from tuneloop.naming import did_you_mean
from tuneloop.redact import mask_url, redact
from tuneloop.runlock import claim_for_study

log = logging.getLogger(__name__)

# Used when no --search-space is given: the knobs that matter most for fine-tuning a classifier.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "optim.learning_rate": {"type": "float", "low": 1e-5, "high": 1e-4, "log": True},
    "train.batch_size": {"type": "categorical", "choices": [8, 16, 32]},
    "train.epochs": {"type": "int", "low": 2, "high": 4},
    "optim.warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
    "optim.weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
}
SPEC_KEYS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
             "categorical": {"type", "choices"}}
# Settings a trial may not sample: where it writes and what it shares.
NOT_SEARCHABLE = {"output.output_dir", "output.overwrite", "output.push_to_hub", "checkpoint.resume"}
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")


def _optuna():
    try:
        import optuna
    except ImportError:
        raise TuneloopError("tuneloop search needs Optuna: pip install 'tuneloop[search]'") from None
    return optuna


def parse_space(raw: Any, source: str = "search space") -> dict[str, dict[str, Any]]:
    """Validate a search space: `{param: {type: float|int|categorical, ...}}` or `{param: [choices]}`.

    Parameters are config fields (`optim.learning_rate`, or a unique short name `learning_rate`); `peft.*`
    and other sections are accepted exactly when the config has them.
    """
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: expected a mapping of parameters to ranges, got {raw!r}")
    paths, shorts = field_paths(), short_names()
    space = {}
    for name, spec in raw.items():
        path = shorts.get(str(name), str(name))
        if path not in paths:
            raise ConfigError(f"{source}: unknown parameter '{name}'{did_you_mean(str(name), list(paths) + list(shorts))}")
        if path in NOT_SEARCHABLE:
            raise ConfigError(f"{source}: '{path}' cannot be searched (it is fixed for the whole study)")
        if isinstance(spec, list):
            spec = {"type": "categorical", "choices": spec}
        if not isinstance(spec, dict) or spec.get("type") not in SPEC_KEYS:
            raise ConfigError(f"{source}: '{name}' needs type float, int or categorical (or a list of choices), "
                              f"got {spec!r}")
        unknown = set(spec) - SPEC_KEYS[spec["type"]]
        if unknown:
            raise ConfigError(f"{source}: '{name}': unknown key(s) {', '.join(sorted(unknown))} for type {spec['type']}")
        if spec["type"] == "categorical":
            if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                raise ConfigError(f"{source}: '{name}': choices must be a non-empty list")
        else:
            try:
                low, high = float(spec["low"]), float(spec["high"])
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"{source}: '{name}': give numbers low and high") from None
            if not low < high:
                raise ConfigError(f"{source}: '{name}': low must be below high, got {low} and {high}")
            if spec.get("log") and low <= 0:
                raise ConfigError(f"{source}: '{name}': a log range needs low > 0, got {low}")
        space[path] = dict(spec)
    return space


def load_space(path: str | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return copy.deepcopy(DEFAULT_SPACE)
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--search-space: file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"--search-space: {p} is not valid YAML: {getattr(e, 'problem', e)}") from None
    return parse_space(raw, f"search space {p}")


def respect_given(space: dict[str, dict[str, Any]], base: Config, space_file: str | None) -> dict[str, Any]:
    """Settings the user gave that the search would replace: each kept (the built-in space) or, when their own
    search space names it, searched, with one line either way; the trial-fixed ones are refused."""
    refuse_fixed_by_the_study(base)
    kept = dict(space)
    for path in sorted(base.given & set(space)):
        section, name = path.split(".")
        value = getattr(getattr(base, section), name)
        if space_file is None:
            del kept[path]
            log.warning("search: %s stays at %r as you set it, so the built-in search space does not sample it",
                        path, value)
        else:
            log.warning("search: %s is sampled from the search space %s, so your setting %r applies to no trial",
                        path, space_file, value)
    if not kept:
        raise ConfigError("every parameter of the built-in search space is set on the command line: nothing to "
                          "search (give --search-space FILE)")
    return kept


def refuse_fixed_by_the_study(base: Config) -> None:
    """--resume and --push-to-hub given to a search would apply to no trial: say why, before any work."""
    for path, why in (("checkpoint.resume", "a search continues with the same command; its trials never resume"),
                      ("output.push_to_hub", "push the best trial afterwards: tuneloop train --config "
                                             "OUT/best_config.yaml --push-to-hub REPO")):
        if path in base.given:
            raise ConfigError(f"{path}: does not apply to tuneloop search ({why})")


def suggest(trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    params = {}
    for path, spec in space.items():
        if spec["type"] == "categorical":
            params[path] = trial.suggest_categorical(path, spec["choices"])
        elif spec["type"] == "int":
            params[path] = trial.suggest_int(path, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)),
                                             log=bool(spec.get("log", False)))
        else:
            params[path] = trial.suggest_float(path, float(spec["low"]), float(spec["high"]), step=spec.get("step"),
                                               log=bool(spec.get("log", False)))
    return params


def config_with(base: Config, params: dict[str, Any], output_dir: str | Path) -> Config:
    """The fixed config plus sampled values, validated like any config."""
    raw = base.to_dict()
    for path, value in params.items():
        section, name = path.split(".")
        raw[section][name] = value
    raw["output"].update(output_dir=str(output_dir), overwrite=True, push_to_hub=None)
    raw["checkpoint"]["resume"] = None
    config = config_from_dict(raw)
    config.given = base.given | set(params)  # what the user set, plus this trial's values (not every default)
    return config


def pruning_hook(trial, main_metric: str):
    """Report each evaluation's main metric at its epoch; stop the trial when the pruner says so."""
    optuna = _optuna()

    def hook(record: dict[str, Any]) -> None:
        score = record.get(main_metric)
        if record.get("type") != "eval" or score is None or not math.isfinite(score):
            return
        epoch = int(record["epoch"])
        with warnings.catch_warnings():  # several evaluations in one epoch: Optuna keeps the first
            warnings.simplefilter("ignore")
            trial.report(score, step=epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}: {main_metric} {score:.4f}")

    return hook


class _OneLine(logging.Filter):
    """Optuna logs a failed trial with its traceback; the trial's error is already one line in trials.csv."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def quiet_failed_trials() -> None:
    for handler in logging.getLogger("optuna").handlers:
        handler.addFilter(_OneLine())


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///` URL; None for any other storage (and for SQLite in memory)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url[len(prefix):] in ("", ":memory:"):
        return None
    return Path(url[len(prefix):].split("?", 1)[0])


def open_storage(url: str):
    _optuna()
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    try:
        # Heartbeats let a restarted or parallel worker fail (and retry once) the trial of a killed worker.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeats are marked experimental in Optuna
            return queue_locked_storage(url, heartbeat_interval=60, grace_period=180,
                                        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    except ImportError as e:
        raise TuneloopError(f"--storage {mask_url(url)}: the database driver is missing ({redact(e, url)})") from None
    except Exception as e:  # sqlalchemy / optuna: an unreachable host, a bad URL, an unwritable file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TuneloopError(f"--storage {mask_url(url)}: cannot open the study storage: {redact(first, url)}") from None


def queue_locked_storage(url: str, **kwargs):
    """Optuna's RDBStorage; on SQLite, starting a WAITING trial (an enqueued retry) is made atomic between workers.

    Optuna claims a queued trial with SELECT ... FOR UPDATE, which SQLite ignores: two workers starting at once
    could both read the retry as WAITING and both run it, into one trial folder. A file lock beside the database
    around that one check-and-set lets exactly one of them have it; other databases lock the row themselves."""
    optuna = _optuna()
    from optuna.storages import RDBStorage

    db = sqlite_path(url)
    if db is None:
        return RDBStorage(url, **kwargs)
    from filelock import FileLock

    class QueueLockedStorage(RDBStorage):
        def set_trial_state_values(self, trial_id, state, values=None) -> bool:
            if state != optuna.trial.TrialState.RUNNING:
                return super().set_trial_state_values(trial_id, state, values)
            with FileLock(str(db) + ".queue.lock"):
                if self.get_trial(trial_id).state != optuna.trial.TrialState.WAITING:
                    return False  # another worker has started it
                return super().set_trial_state_values(trial_id, state, values)

    return QueueLockedStorage(url, **kwargs)


def count_finished(study) -> int:
    """Finished trials, not counting those failed because their worker was killed (each is retried)."""
    optuna = _optuna()
    states = tuple(getattr(optuna.trial.TrialState, s) for s in FINISHED_STATES)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get("interrupted"))


def fail_dead_trials(study) -> list[int]:
    """Fail and re-enqueue this machine's RUNNING trials whose worker died (their folder's run lock is free).

    Without this a killed trial stays RUNNING until Optuna's heartbeat grace period passes; its retry gets a
    new number, so a new folder: no trial folder is ever written by two trials."""
    from tuneloop.runlock import is_alive

    optuna = _optuna()
    host = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        run_dir, worker = t.user_attrs.get("run_dir"), str(t.user_attrs.get("worker", ""))
        if not run_dir or worker.rpartition(":")[0] != host or is_alive(run_dir) or _pid_alive(worker):
            continue
        try:  # another worker starting at the same time may fail it first: then it is that worker's retry
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            study._storage.set_trial_user_attr(t._trial_id, "error", f"interrupted: worker {worker} died")
            if not study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        failed.append(t.number)
    if failed:
        print(f"tuneloop: trial(s) {', '.join(map(str, failed))} were interrupted (their worker died); "
              f"each is retried with the same parameters", flush=True)
    return failed


def stop_at(n_trials: int):
    """A callback that stops the study once it holds `n_trials` finished trials (interrupted ones not counted)."""

    def stop(study, trial) -> None:
        if count_finished(study) >= n_trials:
            study.stop()

    return stop


def _pid_alive(worker: str) -> bool:
    try:
        pid = int(worker.rpartition(":")[2])
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's live process
        return True
    return pid != os.getpid()  # our own pid: reused after the worker died


def search(base: Config, space_file: str | None = None, storage: str | None = None, study_name: str = "tuneloop",
           n_trials: int = 20, timeout: float | None = None, pruner: str = "median") -> dict[str, Any]:
    """Run (or continue) the study until it holds `n_trials` finished trials; write its results; return a summary."""
    optuna = _optuna()
    from tuneloop.data import load_raw

    space = load_space(space_file)
    refuse_fixed_by_the_study(base)
    if n_trials < 1:
        raise ConfigError(f"--n-trials: must be at least 1, got {n_trials}")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"--timeout: must be positive seconds, got {timeout}")
    out = Path(base.output.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{out / 'study.db'}"
    main_metric = load_raw(base.data, need_train=False).main_metric
    study = open_study(url, study_name, pruner, main_metric)
    claim_for_study(out, study_name, url)  # the folder is this study's: another study's search is refused
    space = respect_given(space, base, space_file)  # after the checks that fail, so a failing command says one line
    fail_dead_trials(study)
    done = count_finished(study)
    if done >= n_trials:
        print(f"tuneloop: study '{study_name}' already holds {done} finished trials (--n-trials {n_trials})", flush=True)
    else:
        print(f"tuneloop: study '{study_name}' in {mask_url(url)}: {done} of {n_trials} trials finished; "
              f"objective {main_metric} (maximise)", flush=True)
        try:
            study.optimize(trial_objective(base, space, out, main_metric), timeout=timeout, catch=(Exception,),
                           callbacks=[stop_at(n_trials)])
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: still write what the study holds, then stop
            from tuneloop.signals import Interrupted

            write_results(study, base, space, out, url, main_metric, require_complete=False)
            raise Interrupted(f"search stopped by a signal; the study is in {mask_url(url)}: "
                              f"run the same command to continue it") from None
    return write_results(study, base, space, out, url, main_metric)


def open_study(url: str, study_name: str, pruner: str, main_metric: str):
    """Create the study in the storage, or load it to continue; it maximises `main_metric`."""
    optuna = _optuna()
    study = optuna.create_study(storage=open_storage(url), study_name=study_name, direction="maximize",
                                load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2) if pruner == "median"
                                else optuna.pruners.NopPruner())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental in Optuna; names the value column in its plots
        study.set_metric_names([main_metric])
    return study


def trial_objective(base: Config, space: dict[str, Any], out: Path, main_metric: str):
    """The objective: one trial trains `base` with the trial's parameters into OUT/trial-NNNN/."""
    optuna = _optuna()
    from tuneloop.recipe import train

    def objective(trial) -> float:
        run_dir = out / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            config = config_with(base, suggest(trial, space), run_dir)
            print(f"tuneloop: trial {trial.number} -> {run_dir}: "
                  + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items()),
                  flush=True)
            results = train(config, hooks=[pruning_hook(trial, main_metric)])
        except optuna.TrialPruned:
            raise
        except Exception as e:
            from tuneloop.signals import Interrupted

            if isinstance(e, Interrupted):  # a signal stops the whole search, not just this trial
                raise KeyboardInterrupt from e
            first = str(e).splitlines()[0] if str(e) else ""
            trial.set_user_attr("error", f"{type(e).__name__}: {first}")
            print(f"tuneloop: trial {trial.number} failed: {type(e).__name__}: {first}", flush=True)
            raise
        return float(results[main_metric])

    return objective


def write_results(study, base: Config, space: dict[str, Any], out: Path, url: str, main_metric: str,
                  require_complete: bool = True) -> dict[str, Any]:
    """trials.csv, optimisation history and parameter importance plots, best_config.yaml, search_summary.json."""
    optuna = _optuna()
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration",
                                          "datetime_start"))
    if "duration" in frame:
        frame["duration"] = frame["duration"].dt.total_seconds().round(1)
    frame = frame.rename(columns={"value": main_metric, f"value_{main_metric}": main_metric, "duration": "duration_s"})
    frame.columns = [c.removeprefix("params_").removeprefix("user_attrs_") for c in frame.columns]
    with atomic.replacing(out / "trials.csv") as tmp:
        frame.to_csv(tmp, index=False)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    counts = {s: len(study.get_trials(deepcopy=False, states=(getattr(optuna.trial.TrialState, s),)))
              for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    summary: dict[str, Any] = {"study_name": study.study_name, "storage": mask_url(url), "objective": main_metric,
                               "direction": "maximize", "trials": counts, "space": space}
    _plots(study, out)
    if complete:
        best = study.best_trial
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                       best_run_dir=best.user_attrs.get("run_dir"))
        best_config = config_with(base, best.params, out / "best")
        best_config.output.overwrite = False
        atomic.write_text(out / "best_config.yaml",
                          f"# Best trial {best.number} of study '{study.study_name}': {main_metric} {best.value:.4f}\n"
                          f"# tuneloop train --config {out / 'best_config.yaml'}\n" + best_config.to_yaml())
    atomic.write_json(out / "search_summary.json", summary, default=str)
    lines = [f"tuneloop: study '{study.study_name}': " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v)]
    if complete:
        lines.append(f"best trial {summary['best_trial']}: {main_metric} {summary['best_value']:.4f} with "
                     + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in summary["best_params"].items()))
        lines.append(f"wrote {out / 'best_config.yaml'}, {out / 'trials.csv'} and plots; "
                     f"train it with: tuneloop train --config {out / 'best_config.yaml'}")
    print("\n".join(lines), flush=True)
    if not complete and require_complete:
        errors = [t.user_attrs["error"] for t in study.trials if "error" in t.user_attrs]
        raise TuneloopError(f"no trial of study '{study.study_name}' completed"
                            + (f"; first error: {errors[0]}" if errors else ""))
    return summary


def _plots(study, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    for name, plot in (("optimization_history", vis.plot_optimization_history),
                       ("param_importances", vis.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
                ax = plot(study)
            fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
            fig.set_size_inches(7, 4.5)
            fig.tight_layout()
            with atomic.replacing(out / f"{name}.png") as tmp:
                fig.savefig(tmp, dpi=90, format="png")
            plt.close(fig)
        except Exception as e:  # importances need 2+ complete trials with varied parameters
            log.warning("no %s plot: %s", name.replace("_", " "), str(e).splitlines()[0] if str(e) else e)
            (out / f"{name}.png").unlink(missing_ok=True)
            plt.close("all")
