"""Command line: `tuneloop train | eval | predict | export | serve | data | ...`. Config flags are generated from the dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any

from tuneloop import launch
from tuneloop.config import (SECTIONS, Config, ConfigError, field_paths, load_config, recipe_names,
                             short_names)
from tuneloop.errors import TuneloopError, one_line
from tuneloop.naming import did_you_mean

# Options that belong to the command, not to the config.
COMMAND_OPTIONS = {"config", "print_config", "debug"}


def _metavar(tp: Any) -> str:
    text = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "").replace("NoneType", "null")
    return text if len(text) < 30 else "VALUE"


def add_config_flags(parser: argparse.ArgumentParser, only: set[str] | None = None, taken: tuple[str, ...] = ()) -> None:
    """One flag per config field: `--section.field`, plus `--field-name` where the name is unique (and not `taken`)."""
    shorts = {path: name for name, path in short_names().items() if name not in ("model_dir", *taken)}
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} options")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path = f"{section}.{f.name}"
            if only is not None and path not in only:
                continue
            names = [f"--{path}"]
            if path in shorts:
                names.insert(0, f"--{shorts[path].replace('_', '-')}")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kwargs: dict[str, Any] = dict(dest=path, default=argparse.SUPPRESS,
                                          help=f"{f.metadata.get('help', '')} (default: {default})")
            if hints[f.name] is bool or bool in typing.get_args(hints[f.name]):
                kwargs.update(nargs="?", const="true", metavar="BOOL")
            elif "const" in f.metadata:  # a flag that may stand alone (--resume) or take a value
                kwargs.update(nargs="?", const=f.metadata["const"], metavar="PATH")
            else:
                kwargs.update(metavar=_metavar(hints[f.name]).upper() if "[" not in str(hints[f.name]) else "VALUE")
            group.add_argument(*names, **kwargs)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """`tuneloop serve`'s flags, one per ServeSettings field (its defaults are the flags' defaults)."""
    from tuneloop.serve import ServeSettings

    hints = typing.get_type_hints(ServeSettings)
    for f in dataclasses.fields(ServeSettings):
        kwargs: dict[str, Any] = dict(dest=f"serve.{f.name}", help=f"{f.metadata['help']} (default: {f.default})")
        if hints[f.name] is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = typing.get_args(hints[f.name])[0] if typing.get_args(hints[f.name]) else hints[f.name]
            kwargs.update(type=kind, default=f.default, metavar=f.metadata.get("metavar") or kind.__name__.upper())
        parser.add_argument(f"--{f.name.replace('_', '-')}", required=f.name == "model_dir", **kwargs)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tuneloop", allow_abbrev=False,
                    description="Fine-tune and evaluate Hugging Face sequence classifiers with one visible loop.")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,predict,export,serve,data,search,report,compare}",
                                parser_class=Parser)
    add_train_command(sub)
    add_eval_command(sub)
    add_predict_command(sub)
    add_export_command(sub)
    add_serve_command(sub)
    add_data_command(sub)
    add_search_command(sub)
    add_report_command(sub)
    add_compare_command(sub)
    return parser


def add_config_file_flags(p: argparse.ArgumentParser) -> None:
    """--config and --debug, for the commands that read a config."""
    p.add_argument("--config", metavar="FILE", help="YAML file with config sections, or a built-in recipe name "
                                                 f"({', '.join(recipe_names())}); flags override it")
    add_debug_flag(p)


def add_debug_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def add_train_command(sub) -> None:
    train = sub.add_parser("train", help="fine-tune a model and evaluate it", allow_abbrev=False)
    add_config_file_flags(train)
    train.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    train.add_argument("--seeds", metavar="S,S,...", help="train once per seed into OUT/seed-S/ and summarise the spread "
                                                          "(seeds_summary.json: mean, std, bootstrap 95%% CI)")
    train.add_argument("--folds", metavar="K", help="K-fold cross-validation of the training split into OUT/fold-i/ "
                                                    "(stratified by label), folds_summary.json and oof_predictions.jsonl")
    add_config_flags(train)


def add_eval_command(sub) -> None:
    ev = sub.add_parser("eval", help="re-evaluate a saved model", allow_abbrev=False)
    add_config_file_flags(ev)
    ev.add_argument("--model-dir", dest="model.name_or_path", default=argparse.SUPPRESS, metavar="DIR",
                    help="saved model folder (OUT/model)")
    add_config_flags(ev, only={p for p in field_paths() if p.startswith(("data.", "eval.", "output.output_dir"))
                               } | {"train.mixed_precision"})


def add_predict_command(sub) -> None:
    pr = sub.add_parser("predict", help="predict labels for a JSONL/CSV file", allow_abbrev=False)
    pr.add_argument("--model-dir", required=True, metavar="DIR", help="saved model folder (OUT/model)")
    pr.add_argument("--input", required=True, metavar="FILE|-", help="JSONL or CSV with 'text' (and 'text_pair'); - for stdin")
    pr.add_argument("--output", metavar="FILE", help="write JSON lines here instead of stdout")
    pr.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (default: 32)")
    pr.add_argument("--quantize", metavar="int8", help="int8: dynamic int8 Linear layers on CPU (faster; docs/adapters.md)")
    pr.add_argument("--runtime", default="torch", metavar="torch|onnx",
                    help="torch, or onnx: ONNX Runtime on a folder from export --format onnx (default: torch)")
    pr.add_argument("--precision", default="fp32", metavar="fp32|bf16",
                    help="bf16: torch with bf16 weights, faster on CPUs with AVX512-BF16/AMX (default: fp32)")
    add_debug_flag(pr)


def add_export_command(sub) -> None:
    ex = sub.add_parser("export", help="write a standalone (optionally int8) model folder", allow_abbrev=False)
    ex.add_argument("--model-dir", required=True, metavar="DIR", help="saved model folder (OUT/model or OUT/model-merged)")
    ex.add_argument("--output-dir", required=True, metavar="DIR", help="folder to write (adapters merged, tokenizer included)")
    ex.add_argument("--quantize", metavar="int8", help="int8: int8 Linear weights via torchao (loading needs torchao); "
                                                      "with --format onnx: ONNX Runtime's int8 quantisation")
    ex.add_argument("--format", metavar="onnx", help="onnx: model.onnx for ONNX Runtime, beside the tokenizer and labels "
                                                   "(default: a transformers folder)")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    add_debug_flag(ex)


def add_serve_command(sub) -> None:
    sv = sub.add_parser("serve", help="serve a saved model over HTTP, with dynamic batching and a try-it page",
                        allow_abbrev=False)
    add_settings_flags(sv)
    add_debug_flag(sv)


def add_data_command(sub) -> None:
    data = sub.add_parser("data", help="show what the training loop will see", allow_abbrev=False)
    add_config_file_flags(data)
    add_config_flags(data, only={p for p in field_paths() if p.startswith("data.")} | {
        "model.name_or_path", "train.batch_size", "train.seed"})


def add_search_command(sub) -> None:
    se = sub.add_parser("search", help="hyperparameter search with Optuna (every train flag is fixed for all trials)",
                        allow_abbrev=False)
    add_config_file_flags(se)
    se.add_argument("--search-space", metavar="FILE", help="YAML search space (default: the built-in one; docs/experiments.md)")
    se.add_argument("--storage", metavar="URL", help="Optuna storage URL shared by workers (default: sqlite:///OUT/study.db)")
    se.add_argument("--study-name", default="tuneloop", metavar="NAME", help="study name in the storage (default: tuneloop)")
    se.add_argument("--n-trials", type=int, default=20, metavar="N",
                    help="finished trials (complete, pruned, failed) the study should hold, all workers together (default: 20)")
    se.add_argument("--timeout", type=float, metavar="SECONDS", help="stop this worker after this many seconds")
    se.add_argument("--pruner", choices=("median", "none"), default="median",
                    help="stop trials whose per-epoch score is below the median of earlier trials (default: median)")
    add_config_flags(se, taken=("timeout",))  # --timeout is the search's; --launch.timeout stays


def add_report_command(sub) -> None:
    re_ = sub.add_parser("report", help="write a self-contained report.html for a run, multi-seed or search folder",
                         allow_abbrev=False)
    re_.add_argument("run_dir", metavar="RUN_DIR")
    re_.add_argument("--output", metavar="FILE", help="where to write the HTML (default: RUN_DIR/report.html)")
    add_debug_flag(re_)


def add_compare_command(sub) -> None:
    co = sub.add_parser("compare", help="do two multi-seed runs differ beyond their seed spread?", allow_abbrev=False)
    co.add_argument("run_a", metavar="RUN_A")
    co.add_argument("run_b", metavar="RUN_B")
    co.add_argument("--alpha", type=float, default=0.05, help="significance level of Welch's t-test (default: 0.05)")
    add_debug_flag(co)


def parse_config(args: argparse.Namespace) -> Config:
    flags = {k: v for k, v in vars(args).items() if "." in k}
    return load_config(getattr(args, "config", None), flags)


def quiet_libraries(debug: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if debug:
        return
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight loading/saving bars; ours stays
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    # PEFT imports torchao and bitsandbytes when installed; both log about optional GPU/4-bit kernels we never use.
    for name in ("torchao", "bitsandbytes", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if not launch.is_main_process():  # in a job of several processes, process 0 speaks for all; errors still show
        import warnings

        warnings.filterwarnings("ignore")
        logging.getLogger().setLevel(logging.ERROR)
        logging.getLogger("tuneloop").setLevel(logging.ERROR)


def cmd_train(args: argparse.Namespace) -> int:
    from tuneloop.recipe import train

    config = parse_config(args)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    if args.folds is not None:
        from tuneloop.folds import parse_folds, train_folds

        k = parse_folds(args.folds)
        if args.seeds is not None or launch.needs_launcher(config.launch):
            raise ConfigError("--folds: give it alone (not with --seeds or --num-processes)")
        train_folds(config, k)
        return 0
    if args.seeds is not None:
        from tuneloop.seeds import parse_seeds, train_seeds

        seeds = parse_seeds(args.seeds)
        if launch.needs_launcher(config.launch):
            raise ConfigError("--seeds with --num-processes: start one multi-process run per seed instead")
        train_seeds(config, seeds)
        return 0
    if launch.needs_launcher(config.launch):  # --num-processes: run this same command in every process
        from tuneloop.recipe import check_output_dir

        check_output_dir(config)  # fail once, here, rather than in every process
        return launch.start(config, args.argv, debug=args.debug)
    results = train(config)
    if results and launch.is_main_process():
        print(json.dumps(results, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tuneloop.recipe import evaluate_model, write_json

    if not getattr(args, "model.name_or_path", None):
        raise ConfigError("eval needs --model-dir (a folder written by tuneloop train, e.g. runs/mrpc/model)")
    config = parse_config(args)
    results = evaluate_model(config)
    if not launch.is_main_process():  # under torchrun every process has the same, gathered results
        return 0
    flat = results if len(results) > 1 else next(iter(results.values()))
    print(json.dumps(flat, indent=2))
    if "output.output_dir" in vars(args):
        out = Path(config.output.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval_results.json", flat)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from tuneloop.export import check_quantize
    from tuneloop.predict import check_precision, check_runtime, predict

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be at least 1, got {args.batch_size}")
    check_quantize(args.quantize)
    check_runtime(args.runtime)
    check_precision(args.precision, args.runtime, args.quantize)
    count = predict(args.model_dir, args.input, args.output, args.batch_size, quantize=args.quantize,
                    runtime=args.runtime, precision=args.precision)
    if args.output:
        print(f"wrote {count} predictions to {args.output}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tuneloop.export import export, folder_size
    from tuneloop.onnx_export import check_format, export_onnx

    if check_format(args.format) == "onnx":
        out = export_onnx(args.model_dir, args.output_dir, args.quantize, overwrite=args.overwrite)
        print(f"wrote {out} ({folder_size(out) / 2**20:.1f} MiB, {'int8 ' if args.quantize else ''}model.onnx: "
              f"loads with onnxruntime and tokenizers alone)", file=sys.stderr)
        return 0
    out = export(args.model_dir, args.output_dir, args.quantize, overwrite=args.overwrite)
    print(f"wrote {out} ({folder_size(out) / 2**20:.1f} MiB"
          + (", int8 weights: loading needs transformers and torchao)" if args.quantize else ")"), file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tuneloop.serve import ServeSettings, serve

    serve(ServeSettings(**{k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("serve.")}))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from tuneloop.data import Collator, load_raw, tokenize_splits
    from tuneloop.model import build_tokenizer
    from tuneloop.preview import summarize

    from tuneloop.recipe import fit_to_model

    config = fit_to_model(parse_config(args))
    PartialState()
    tokenizer = build_tokenizer(config.model.name_or_path)
    raw = load_raw(config.data, need_train=False)
    tokenized = tokenize_splits(raw, tokenizer, config.data)
    print(summarize(raw, tokenized, tokenizer, Collator(tokenizer, config.data), config))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from tuneloop.search import quiet_failed_trials, search

    config = parse_config(args)
    if not args.debug:
        quiet_failed_trials()
    search(config, space_file=args.search_space, storage=args.storage, study_name=args.study_name,
           n_trials=args.n_trials, timeout=args.timeout, pruner=args.pruner)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tuneloop.report import render_report

    path = render_report(args.run_dir, args.output)
    print(f"wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tuneloop.seeds import compare

    if not 0 < args.alpha < 1:
        raise ConfigError(f"--alpha: must be between 0 and 1, got {args.alpha}")
    print(compare(args.run_a, args.run_b, args.alpha))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "export": cmd_export, "serve": cmd_serve,
            "data": cmd_data,
            "search": cmd_search, "report": cmd_report, "compare": cmd_compare}


def serve_flag_names() -> list[str]:
    from tuneloop.serve import ServeSettings

    return [f.name for f in dataclasses.fields(ServeSettings)]


def _unknown_option_error(argv: list[str], command: str | None) -> None:
    """Name the closest valid flag for a typo, before argparse's generic message."""
    known = {f"--{p}" for p in field_paths()} | {f"--{n.replace('_', '-')}" for n in short_names()}
    known |= {"--config", "--print-config", "--debug", "--model-dir", "--input", "--output", "--batch-size",
              "--quantize", "--output-dir", "--overwrite", "--seeds", "--folds", "--search-space", "--storage", "--study-name",
              "--n-trials", "--timeout", "--pruner", "--alpha", "--runtime", "--format", "--precision"}
    known |= {f"--{f.replace('_', '-')}" for f in serve_flag_names()} | {"--no-access-log"}
    for token in argv:
        if token.startswith("--"):
            name = token.split("=", 1)[0]
            if name not in known and name.replace("_", "-") not in known and name != "--help":
                raise ConfigError(f"unknown option '{name}'{did_you_mean(name, known)}")


def _dashed(token: str) -> str:
    if not token.startswith("--"):
        return token
    name, eq, value = token.partition("=")
    return (name if "." in name else name.replace("_", "-")) + eq + value


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tuneloop: %(levelname)s: %(message)s"))
    package_log = logging.getLogger("tuneloop")
    package_log.handlers[:] = [handler]
    package_log.setLevel(logging.INFO if debug else logging.WARNING)
    package_log.propagate = False
    try:
        parser = build_parser()
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0 if argv else 2
        if argv[0] not in COMMANDS:
            raise ConfigError(f"unknown command '{argv[0]}'{did_you_mean(argv[0], COMMANDS)}; use one of {', '.join(COMMANDS)}")
        _unknown_option_error(argv[1:], argv[0])
        # Underscores are accepted as well as dashes: --learning_rate == --learning-rate.
        argv = [_dashed(a) for a in argv]
        args = parser.parse_args(argv)
        args.argv = argv  # a launcher runs the same command in each process
        quiet_libraries(debug)
        return COMMANDS[args.command](args)
    except TuneloopError as e:
        if debug:
            raise
        launch.record_error(str(e))
        print(f"tuneloop: error: {launch.error_prefix()}{one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tuneloop: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything unexpected still ends in one line unless --debug
        if debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        message = f"{type(e).__name__}: {first}"
        launch.record_error(message)
        print(f"tuneloop: error: {launch.error_prefix()}{one_line(message)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
