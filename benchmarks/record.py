"""Shared by the benchmark scripts: their command line, a local Ray cluster, a printed table, and one JSON line
per run.

Every script takes `--quick` (tiny sizes, for the smoke test: its size options default to them, and one
given on the command line is kept), `--out DIR` (where `<benchmark>.jsonl` gets one line per run: benchmark,
time, git commit, machine, config, results) and `--traceback`; `run_benchmark` runs its main.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from drift_ray.signals import sigterm_interrupts, terminated
from drift_ray.trajectories import fsync_directory

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# --quick for the scripts that run the whole pipeline: a few prompts and samples, one epoch.
QUICK_PIPELINE_OVERRIDES = ["task.num_train=8", "task.num_test=8", "rollout.samples_per_prompt=4", "train.epochs=1"]


def reused_work(work: dict[str, Any], samples_rollouts: bool) -> bool:
    """Whether a round of a pipeline run (its entry in pipeline.RUN_RECORD_FILE) took over work that a run before
    it did, or waited for another run, so that its timings are seconds, not cost: finished weights or a
    finished model, a killed training resumed from its checkpoint, where the round was to sample its
    rollouts itself (`samples_rollouts`), some prompts' rollouts, or a wait for another run's turn at
    shared rollouts (absent from the records of older runs)."""
    return (
        work["weights_reused"]
        or work["model_reused"]
        or work["resumed_from_step"] > 0
        or (samples_rollouts and work["rollouts"]["reused"] > 0)
        or work["rollouts"].get("waited_seconds", 0) > 0
    )


class _BenchmarkParser(argparse.ArgumentParser):
    """Refuses, when it parses, a results file that append_result would refuse after the run: no run is lost.
    Fills in the size options left unset: their --quick size with --quick, else their full one."""

    benchmark: str
    sizes: dict[str, tuple[Any, Any]]

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        for dest, (full, quick) in self.sizes.items():
            if getattr(parsed, dest) is None:
                setattr(parsed, dest, quick if parsed.quick else full)
        if parsed.out is None:
            # A smoke test's line among the measured ones would read as a measurement of the committed results.
            quick = Path(tempfile.mkdtemp(prefix=f"{self.benchmark}-quick-")) if parsed.quick else None
            if quick:
                print(f"--quick: this smoke test's line goes to {quick}, not to the committed results", file=sys.stderr)
            parsed.out = quick or RESULTS
        if parsed.out.exists() and not parsed.out.is_dir():
            self.error(f"argument --out: {parsed.out} is not a directory")
        results = parsed.out / f"{self.benchmark}.jsonl"
        if incomplete_last_line(results):
            self.error(f"{results}: {INCOMPLETE_LAST_LINE}; remove or mend it first")
        return parsed


def argument_parser(doc: str, benchmark: str) -> argparse.ArgumentParser:
    """A parser with the options every benchmark has; `doc` is the script's docstring (its first paragraph
    describes it), `benchmark` the name its results go under (append_result)."""
    parser = _BenchmarkParser(description=" ".join(doc.strip().split("\n\n")[0].split()), allow_abbrev=False)
    parser.benchmark, parser.sizes = benchmark, {}
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory of the <benchmark>.jsonl results (default: benchmarks/results; with --quick, a new "
        "temporary directory, so that no smoke test's line joins the measured ones)",
    )
    parser.add_argument("--traceback", action="store_true", help="show the traceback of an error, not its message alone")
    return parser


def whole_number(least: int, refusal: str | None = None) -> Callable[[str], int]:
    """An argparse type: an int of at least `least`, else "VALUE `refusal`" after the flag's name."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if number < least:
            raise argparse.ArgumentTypeError(f"{value} {refusal or f'is below {least}, the least it takes'}")
        return number

    return parse


def add_size_option(parser: argparse.ArgumentParser, flag: str, *, full: int, quick: int, help: str, least: int = 1) -> None:
    """An option that sizes the work: a whole number of at least `least`, `full` by default, `quick` with --quick."""
    parser.add_argument(flag, type=whole_number(least), default=None, help=f"{help} (default {full}; {quick} with --quick)")
    parser.sizes[flag.lstrip("-").replace("-", "_")] = (full, quick)


def run_benchmark(main: Callable[[], None]) -> None:
    """A benchmark's main: SIGTERM (`kill`, `timeout`) ends it as Ctrl-C does, so that its temporary
    directories go with it, then as the signal would; an error that names what to mend (a config, a path,
    a run_dir in use) is one line and exit status 2, its traceback with --traceback."""
    with sigterm_interrupts():
        try:
            main()
        except KeyboardInterrupt as interrupt:
            if not terminated(interrupt):
                raise
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        except (ValueError, OSError, RuntimeError) as err:
            if "--traceback" in sys.argv[1:]:
                raise
            print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
            sys.exit(2)


def add_tmp_dir_option(parser: argparse.ArgumentParser) -> None:
    """--tmp-dir, for a benchmark that runs the pipeline in a run_dir of its own, made and removed there."""
    parser.add_argument(
        "--tmp-dir",
        type=_made_directory,
        default=None,
        help="where the benchmark's temporary run_dir is made (default: the system's temporary directory); on a "
        "cluster of several nodes, storage every node sees, as for run_dir",
    )


def _made_directory(value: str) -> Path:
    path = Path(value).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot make directory {value}: {err.strerror}") from None
    return path


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[float]:
    """A new Ray cluster of `num_cpus` logical CPUs for the measurement, shut down after it; yields the seconds
    it took to start.

    Started as drift-ray starts its own (pipeline.start_local_ray): a bare ray.init would join a cluster that
    `ray start` runs on this machine (and refuse num_cpus there), so the figures would come from a cluster of
    another size; and a training's placement-group cleaner would ask that cluster whether it lives.
    """
    import ray.data

    from drift_ray.pipeline import start_local_ray

    started = time.perf_counter()
    start_local_ray(num_cpus, log_to_driver=False, logging_level=logging.WARNING)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield time.perf_counter() - started
    finally:
        ray.shutdown()


def machine() -> dict[str, Any]:
    """What a result depends on beyond the code: float results on CPU change with the processor's
    instruction set (torch picks its kernels by it) and with the library versions."""
    import torch

    return {
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: installed_version(name) for name in ("transformers", "deepspeed", "ray", "numpy", "pyarrow")},
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def commit(repo: Path = ROOT) -> str:
    """The short commit of the checkout `repo`, with -dirty when tracked files changed, but for the result
    lines the benchmarks append under benchmarks/results (a second run would otherwise read as other code)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"],
            cwd=repo, capture_output=True, text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def weight_checksums(model: str) -> dict[str, str] | None:
    """The sha256 of each `*.safetensors` file of a local model directory, by file name (what `sha256sum`
    prints); None for a hub id or a directory without such files. The demo reference is pre-trained on every
    machine whose cache lacks it, and another processor can pre-train another model from the same recipe:
    two result lines share their reference only when these agree."""
    directory = Path(model)
    if not directory.is_dir():
        return None
    checksums = {}
    for path in sorted(directory.glob("*.safetensors")):
        digest = hashlib.sha256()
        with path.open("rb") as weights:
            for chunk in iter(lambda: weights.read(1 << 24), b""):
                digest.update(chunk)
        checksums[path.name] = digest.hexdigest()
    return checksums or None


def without_machine_paths(value: Any) -> Any:
    """`value` (nested dicts, lists and strings) with each absolute path under a known place rewritten to name
    that place instead of where it is on this machine: relative to the repository, or starting `<cache>/`
    (the drift-ray cache), `<tmp>/` or `~/`. Result lines are committed and compared across machines: they
    should say which config and which cached reference, not where either sat.
    """
    from drift_ray.pipeline import cache_dir

    places = [(str(cache_dir().resolve()), "<cache>"), (str(ROOT), ""), (str(Path(tempfile.gettempdir()).resolve()), "<tmp>"),
              (str(Path.home().resolve()), "~")]
    places.sort(key=lambda place: len(place[0]), reverse=True)  # the innermost place names a path

    def rewrite(item: Any) -> Any:
        if isinstance(item, dict):
            return {key: rewrite(inner) for key, inner in item.items()}
        if isinstance(item, (list, tuple)):
            return [rewrite(inner) for inner in item]
        if isinstance(item, str) and os.path.isabs(item):
            for root, name in places:
                if item == root or item.startswith(root + os.sep):
                    relative = os.path.relpath(item, root)
                    return f"{name}/{relative}" if name else relative
        return item

    return rewrite(value)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")


def append_result(
    benchmark: str, config: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path = RESULTS
) -> Path:
    """Append one JSON line to `out_dir/<benchmark>.jsonl` and return that path.

    The line holds: benchmark, time, commit, machine, config (the sizes measured) and results (the rows),
    with every path in them written by `without_machine_paths`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{benchmark}.jsonl"
    record = {
        "benchmark": benchmark,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "commit": commit(),
        "machine": machine(),
        "config": without_machine_paths(config),
        "results": without_machine_paths(rows),
    }
    line = json.dumps(record) + "\n"
    if incomplete_last_line(path):
        # Appended after it, this line would join the cut-short one: a reader (one json.loads per line)
        # would find one unreadable line where two records were meant. The run's line comes with the
        # refusal, so that a measurement of hours is not lost with it.
        raise ValueError(
            f"{path}: {INCOMPLETE_LAST_LINE}; remove or mend it, then append this run's line, the last of this "
            f"message, by hand:\n{line.rstrip()}"
        )
    created = not path.exists()
    with path.open("a") as f:
        f.write(line)
        # On disk before the run reports it appended: a power cut soon after would leave a cut-short line.
        f.flush()
        os.fsync(f.fileno())
    if created:
        fsync_directory(out_dir)
    return path


INCOMPLETE_LAST_LINE = "its last line is incomplete (an append was cut short)"


def incomplete_last_line(path: Path) -> bool:
    """Whether the results file `path` ends in a line without its newline: an append was cut short (a kill,
    a full disk, a power cut). A missing or empty file has no such line."""
    try:
        with Path(path).open("rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)
