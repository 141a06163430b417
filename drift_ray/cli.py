"""drift-ray (or python -m drift_ray): one entry point for every stage and the whole pipeline."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import select
import signal
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path

from drift_ray.config import Config, ConfigError, EngineKind, field_docs, load_config, override_key, override_keys
from drift_ray.signals import sigterm_interrupts, terminated

# An evaluated model's label names its directory under run_dir/eval: no separators, no "." or "..",
# and not the name of a report file there.
_LABEL = re.compile(r"(?!eval\.(?:json|md|png)$)[\w:+-][\w.:+-]*")


def _config(args: argparse.Namespace, flags: Mapping[str, str] | None = None) -> Config:
    """The config of --config and the overrides. `flags`: override → the flag that gave it, applied before
    the overrides (and named in errors by that flag)."""
    flags = flags or {}
    cfg = load_config(args.config, [*flags, *args.overrides], given_as={override_key(item): flag for item, flag in flags.items()})
    if cfg.rounds > 1 and args.command in ("rollouts", "weights", "train"):
        logging.getLogger("drift_ray").warning(
            "rounds=%d: drift-ray %s is one stage of round 1 and reads no rounds; `drift-ray run` plays them all",
            cfg.rounds, args.command,
        )
    return cfg


def cmd_weights(args: argparse.Namespace) -> int:
    from drift_ray import pipeline
    from drift_ray.weights import weight_warnings, weights_file

    values = {dest: getattr(args, dest) for dest in ("beta", "gamma", "rep_lambda", "format_penalty", "mode")}
    given = {dest: value for dest, value in values.items() if value is not None}
    flag_of = {dest: "--" + dest.replace("_", "-") for dest in given}
    for override in args.overrides:
        # Overrides come last: one of the flag's key, or of the whole section, would silently win.
        overridden = override_key(override)
        for dest in given:
            if overridden in (f"weights.{dest}", "weights"):
                raise ValueError(f"{flag_of[dest]} and the override {override!r} both set weights.{dest}; give one of them")
    cfg = _config(args, {f"weights.{dest}={value}": flag_of[dest] for dest, value in given.items()})
    pipeline.warn_of_outputs_left_in_the_job({"--output": args.output})
    diagnostics = weights_file(args.input, args.output, cfg.weights)
    print(json.dumps(diagnostics, indent=2))
    for warning in weight_warnings(diagnostics):
        pipeline.log.warning("weights: %s", warning)
    print(f"wrote {args.output}")
    return 0


def cmd_rollouts(args: argparse.Namespace) -> int:
    from drift_ray import pipeline

    cfg = _config(args)
    pipeline.check_model_here(cfg.rollout.model, cfg)  # before the task, which may be a download
    task = pipeline.training_task(cfg, evaluated=False)
    pipeline.check_rollouts_before_the_model(cfg, task)
    model = pipeline.resolve_model(cfg.rollout.model, cfg)
    with pipeline.lock_run_dir(cfg, "rollouts", writes_rollouts=True):
        summary = pipeline.run_rollouts(cfg, task, model, functools.partial(pipeline.connect_ray, cfg, ("rollouts",)))
    print(json.dumps(summary, indent=2))
    print(f"trajectories in {pipeline.rollouts_dir(cfg)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from drift_ray import pipeline
    from drift_ray.train import read_stats, require_training_input

    cfg = _config(args)
    require_training_input(args.input)  # before the model is built and Ray starts
    if args.model is None and cfg.rollout.engine is EngineKind.openai:
        raise ValueError(
            f"rollout.engine=openai: rollout.model {cfg.rollout.model!r} names the server's model; give the model "
            "to train with --model (a directory or a Hub id)"
        )
    model = pipeline.resolve_model(cfg.rollout.model if args.model is None else args.model, cfg, to_train=True)
    with pipeline.lock_run_dir(cfg, "train", writes_rollouts=False):
        trained = pipeline.run_training(cfg, model, functools.partial(pipeline.connect_ray, cfg, ("train",)), args.input)
    print(json.dumps(read_stats(trained), indent=2, sort_keys=True))
    print(f"trained model in {trained}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from drift_ray import pipeline
    from drift_ray.evaluation import comparison_table

    cfg = _config(args)
    paths = {}
    for spec in args.model:
        label, sep, path = spec.partition("=")
        if not sep or "/" in label or Path(spec).exists():  # no label, or an "=" in a path such as lr=1e-5/model
            label, path = Path(spec).name or spec, spec
        elif not path:
            raise ValueError(f"--model {spec}: no model after the label; give LABEL=PATH, e.g. --model {label}=runs/demo/train/model")
        if not _LABEL.fullmatch(label):
            raise ValueError(
                f"--model {spec}: the label {label!r} names the directory eval/{label}; give one of letters, digits "
                "and _ . : + - that does not start with a dot, e.g. --model drift=PATH"
            )
        if label in paths:
            raise ValueError(f"--model: two models labelled {label!r}; label each, e.g. --model {label}-2={path}")
        pipeline.check_model_here(path, cfg)  # before the task, which may be a download
        paths[label] = path
    task = pipeline.evaluation_task(cfg)
    pipeline.check_evaluations_before_the_models(cfg, task, list(paths))
    models = {label: pipeline.resolve_model(path, cfg) for label, path in paths.items()}
    with pipeline.lock_run_dir(cfg, "eval", writes_rollouts=False):
        report = pipeline.run_eval(cfg, task, models, start_ray=functools.partial(pipeline.connect_ray, cfg, ("eval",)))
    print(comparison_table(report["metrics"], cfg.episode.max_turns))
    print(f"plot: {report['paths']['plot']}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from drift_ray import pipeline
    from drift_ray.evaluation import comparison_table

    cfg = _config(args)
    result = pipeline.run_pipeline(cfg)
    print(json.dumps({"timings_s": result["timings_s"]}, indent=2))
    print(comparison_table(result["metrics"], cfg.episode.max_turns))
    print(f"plot: {result['paths']['plot']}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.doc:
        if args.config or args.overrides:  # else a typo in them would go unnoticed
            raise ValueError("--doc documents every field and reads no config: give it without --config or overrides")
        for key, default, doc in field_docs():
            print(f"{key} = {default!r}\n    {doc}")
        return 0
    import yaml

    print(yaml.safe_dump(_config(args).model_dump(mode="json"), sort_keys=False))
    return 0


# main's status after Ctrl-C or SIGTERM, or a reader of its output that went away (`config --doc | head`): a
# shell's for a process that the signal ended.
INTERRUPTED, TERMINATED, OUTPUT_CLOSED = 128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGPIPE


class _GivenOnce(argparse.Action):
    """A flag of one value: given twice, argparse would keep the last without a word."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice: give it once")
        setattr(namespace, self.dest, values)


def _config_path(text: str) -> str:
    if not text:  # Path("") is the current directory
        raise argparse.ArgumentTypeError("an empty path")
    return text


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `train --mode uniform` would read as `--model uniform`, a hub id.
    parser = argparse.ArgumentParser(prog="drift-ray", description=__doc__, allow_abbrev=False)
    traceback_help = (
        "on an error, show its whole traceback instead of the error message alone; on Ctrl-C or SIGTERM, show "
        "the traceback of where it stopped"
    )
    parser.add_argument("--traceback", action="store_true", help=traceback_help)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, fn, help: str, config_required: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, allow_abbrev=False)
        # After the command too; unset there, it leaves the value given before the command.
        p.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=traceback_help)
        p.add_argument("--config", required=config_required, type=_config_path, action=_GivenOnce, help="YAML config (see jobs/)")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides (a later one wins)")
        p.set_defaults(fn=fn, parser=p)
        return p

    p = command("weights", cmd_weights, "returns and importance weights of a trajectory file", config_required=False)
    p.add_argument(
        "--input",
        required=True,
        action=_GivenOnce,
        help="trajectories: our Parquet or JSONL (.jsonl or .jsonl.gz), the authors' JSONL, or a directory of "
        "Parquet files (a run's rollouts/)",
    )
    p.add_argument("--output", required=True, action=_GivenOnce, help="Parquet with every input column plus return and weight")
    p.add_argument("--beta", type=float, action=_GivenOnce, help="β (weights.beta)")
    p.add_argument("--gamma", type=float, action=_GivenOnce, help="γ (weights.gamma)")
    p.add_argument("--rep-lambda", type=float, action=_GivenOnce, help="λ (weights.rep_lambda)")
    p.add_argument("--format-penalty", type=float, action=_GivenOnce, help="re-price format failures (weights.format_penalty)")
    p.add_argument("--mode", choices=["drift", "uniform", "success_only"], action=_GivenOnce, help="weights.mode")
    command("rollouts", cmd_rollouts, "play K episodes per training prompt with the reference policy")
    p = command("train", cmd_train, "weighted SFT of a model on weighted trajectories (drift-ray weights' output)")
    p.add_argument(
        "--input", required=True, action=_GivenOnce, help="Parquet file or directory with trajectory_id, messages, weight"
    )
    p.add_argument(
        "--model",
        action=_GivenOnce,
        help="model to train: local path, hub id or builtin:demo (default: rollout.model; "
        "needed with rollout.engine=openai)",
    )
    p = command("eval", cmd_eval, "greedy multi-turn evaluation of one or several models")
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="MODEL or LABEL=MODEL, where MODEL is a local path, hub id or builtin:demo (or, with "
        "rollout.engine=openai, the server's model name); repeat to compare",
    )
    command("run", cmd_run, "the whole pipeline: rollouts → weights → weighted SFT → evaluation")
    p = command("config", cmd_config, "print the resolved config (or --doc: every field)", config_required=False)
    p.add_argument("--doc", action="store_true", help="document every config field")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = build_parser()
    # Overrides after a flag (`--input a key=1 --output b key=2`) are left over by argparse: still overrides,
    # refused as any other where they have no '='. An unknown flag is named without what follows its '=', which
    # may be a secret.
    args, left_over = parser.parse_known_args(argv)
    unknown = [item.partition("=") for item in left_over if item.startswith("-")]
    if unknown:
        # The command's own usage. No close match: train's --model would be offered for weights' --mode.
        args.parser.error(f"unrecognized arguments: {' '.join(flag + ('=…' if sep else '') for flag, sep, _ in unknown)}")
    args.overrides += left_over
    for repeated in _repeated_overrides(args.overrides):
        logging.getLogger("drift_ray").warning("%s", repeated)
    try:
        with sigterm_interrupts():
            status = args.fn(args)
            sys.stdout.flush()  # here, not at exit: a pipe's buffered output fails as a closed one
            return status
    except BrokenPipeError as err:
        if not _output_closed():
            return _error(args, err)
        return OUTPUT_CLOSED
    except (ConfigError, ValueError, OSError, RuntimeError) as err:
        return _error(args, err)
    except KeyboardInterrupt as err:
        # Else a traceback through Ray Data's queue threads, which reads like a crash. Shown on request, the
        # command still ends as an interrupted one, so that a shell loop around it stops there too.
        if args.traceback:
            traceback.print_exc()
        print(
            f"drift-ray {args.command}: {'terminated' if terminated(err) else 'interrupted'}; run the same command "
            "again to go on from what it finished (rollout and evaluation shards, training checkpoints, finished "
            "stages)",
            file=sys.stderr,
        )
        return TERMINATED if terminated(err) else INTERRUPTED


def _error(args: argparse.Namespace, err: Exception) -> int:
    """An expected user error (OSError: a path that is a file, a directory or not allowed) as one clear line.
    The same types come from bugs too, whose traceback --traceback shows."""
    if args.traceback:
        raise err
    print(f"drift-ray {args.command}: error: {err}", file=sys.stderr)
    return 2


def _output_closed() -> bool:
    """Whether the reader of standard output went away (`config --doc | head`), which is no error of the
    command: a broken pipe elsewhere (a socket) is one. Standard output then writes to nowhere, as Python would
    fail again flushing it at exit."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        closed = any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))  # a pipe without reader
    except (OSError, ValueError, AttributeError):  # no file descriptor; no poll on this system
        return False
    if closed:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return closed


def _repeated_overrides(overrides: list[str]) -> list[str]:
    """Where a later override sets a key that an earlier one set (`seed=1 seed=2`, `train={lora: {r: 8}}
    train.lora.r=4`), or a section that holds it (`task.options.a=1 task.options={b: 2}`), and wins: told, as
    a script's `$BASE seed=2` means it, a slip does not. A key inside a section set before it, which that
    override did not set, adds to that section (`task={kind: file} task.num_test=5`)."""
    told, earlier = [], []
    # An item without '=' is refused by the config, which does not show it: it may be a secret.
    for item in (item for item in overrides if "=" in item):
        key = override_key(item)
        if key in earlier:
            told.append(f"{key} is overridden twice: the later value is used")
        elif inside := [other for other in earlier if other.startswith(key + ".")]:
            told.append(f"the override of {key} replaces the section in which earlier overrides set {', '.join(inside)}")
        earlier.extend(override_keys(item))
    return told


def entry() -> None:
    """The drift-ray command: exits with main's status, except that a command interrupted or terminated dies
    of its signal, as Python's own uncaught KeyboardInterrupt does, so that a shell loop around it stops there
    too."""
    status = main()
    signum = {INTERRUPTED: signal.SIGINT, TERMINATED: signal.SIGTERM, OUTPUT_CLOSED: signal.SIGPIPE}.get(status)
    if signum is not None:
        ray = sys.modules.get("ray")  # a local cluster of this process goes with it
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    sys.exit(status)


if __name__ == "__main__":
    entry()
