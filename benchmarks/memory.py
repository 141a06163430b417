"""Memory of weighted-SFT workers: ZeRO-3 with each rank loading only its share of the model, against
ZeRO-3 with every rank loading the whole model first, and ZeRO-2.

A randomly initialised model of the demo architecture, wider and deeper (`--hidden`, `--layers`) and saved
in bfloat16 as released checkpoints are (`--checkpoint-dtype`), trains for a few steps on the scripted
teacher's weighted trajectories (as in sft.py), on 2 Ray Train workers of one CPU each. The "whole" row
runs the same ZeRO-3 training with partitioned loading turned off in the workers, as it is with a
transformers release before `train.PARTITIONED_LOADING_SINCE`. Per run:
- anon_before_loading_mb, anon_after_loading_mb: each rank's anonymous resident memory (RssAnon of
  /proc/self/status) right before `from_pretrained` and right after it returned, as a wrapper around it in
  the workers reads them. Anonymous: the checkpoint's file pages that a rank reads through mmap are page
  cache, which the kernel can drop and which processes reading the same file share. Training loads in
  float32, so a bfloat16 checkpoint is converted into memory of the rank's own; a float32 one may stay
  mapped from the file;
- anon_after_trim_mb and added_by_loading_mb: the same right after that, once glibc's malloc_trim(0) has
  returned the heap's free pages to the kernel, and how much more that is than before loading (read after
  a trim too). Freed memory that glibc keeps in its heap for the process's next allocations still counts
  in RssAnon: what the trim returns is memory loading used for a while and let go;
- peak_rss_after_loading_mb, peak_rss_training_mb, peak_rss_mb: the largest peak resident memory of a
  worker process (ru_maxrss) when loading returned, before the final save (the last line of the steps
  file) and over the whole run (the run's statistics). The trims above run in the workers before
  training, so these are peaks of trimmed processes;
- loaded_partitioned, from the run's statistics: whether every rank held only its share of the weights
  after loading.

    .venv/bin/python benchmarks/memory.py [--hidden 1024] [--layers 12] [--quick] [--out DIR]
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import add_size_option, append_result, argument_parser, local_ray, print_table, run_benchmark  # noqa: E402
from sft import weighted_trajectories  # noqa: E402

from drift_ray import train as train_module  # noqa: E402
from drift_ray.config import Config, TrainConfig  # noqa: E402
from drift_ray.demo_model import save_untrained_demo_model  # noqa: E402

SEED = 0
WORKERS = 2
MICRO_BATCH = 2


def save_model(path: Path, hidden: int, layers: int, dtype: torch.dtype) -> int:
    """A random demo-architecture model of `hidden` width and `layers` layers in `path`, its weights in
    `dtype`; returns its parameter count."""
    heads = max(1, hidden // 64)
    size = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 4), intermediate_size=int(hidden * 2.75))
    counted = []

    def cast(model: torch.nn.Module, tokenizer: Any) -> None:
        counted.append(sum(p.numel() for p in model.parameters()))
        model.to(dtype)

    save_untrained_demo_model(path, seed=SEED, size=size, prepare=cast)
    return counted[0]


def memory_after_loading_loop(record_dir: str, partitioned: bool) -> Callable[[dict[str, Any]], None]:
    """train_loop that writes this rank's memory around every from_pretrained (see the module's docstring)
    to `record_dir`/rank-<r>.json; with `partitioned` off, every rank loads the whole model (train_loop reads
    loads_partitioned through its module, which the wrapper replaces in the worker process)."""

    def loop(config: dict[str, Any]) -> None:
        import ray.train
        from transformers import AutoModelForCausalLM

        rank = ray.train.get_context().get_world_rank()
        load = AutoModelForCausalLM.from_pretrained

        def load_and_record(*args: Any, **kwargs: Any) -> Any:
            before = anonymous_resident_mb(trim=True)
            model = load(*args, **kwargs)
            record = {
                "before": before,
                "after": anonymous_resident_mb(),
                "after_trim": anonymous_resident_mb(trim=True),
                "peak": round(train_module.peak_rss_mb(), 1),
            }
            Path(record_dir, f"rank-{rank}.json").write_text(json.dumps(record))
            return model

        AutoModelForCausalLM.from_pretrained = load_and_record
        if not partitioned:
            train_module.loads_partitioned = lambda train, version: False
        train_module.train_loop(config)

    return loop


def per_rank(megabytes: Iterable[float]) -> str:
    """Rank 0's value / rank 1's …, in whole MiB."""
    return " / ".join(f"{mb:,.0f}" for mb in megabytes)


def steps_file_peak(run_dir: Path) -> float:
    last_step = (run_dir / train_module.MODEL_DIR / train_module.STEPS_FILE).read_text().splitlines()[-1]
    return json.loads(last_step)["peak_rss_mb"]


def anonymous_resident_mb(trim: bool = False) -> float:
    if trim:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))
    return round(kib / 1024, 1)


def measure(
    label: str, zero_stage: int, partitioned: bool, model_dir: Path, weighted_dir: Path, work_dir: Path, steps: int
) -> dict:
    train = TrainConfig(
        num_workers=WORKERS,
        cpus_per_worker=1,
        zero_stage=zero_stage,
        global_batch_size=MICRO_BATCH * WORKERS,
        micro_batch_size=MICRO_BATCH,
        lr=1e-4,
        warmup_ratio=0.0,
        epochs=1,
        max_length=256,
    )
    run_dir = work_dir / label.replace(" ", "-")
    record_dir = run_dir / "memory"
    record_dir.mkdir(parents=True)
    stats = train_module.train_weighted_sft(
        Config(seed=SEED, train=train),
        str(weighted_dir),
        str(model_dir),
        str(run_dir),
        train_loop_per_worker=memory_after_loading_loop(str(record_dir), partitioned),
    )
    assert stats["steps"] == steps, stats["steps"]
    records = [json.loads((record_dir / f"rank-{rank}.json").read_text()) for rank in range(WORKERS)]
    return {
        "run": label,
        "zero_stage": zero_stage,
        "loaded_partitioned": stats["loaded_partitioned"],
        "anon_before_loading_mb": per_rank(r["before"] for r in records),
        "anon_after_loading_mb": per_rank(r["after"] for r in records),
        "anon_after_trim_mb": per_rank(r["after_trim"] for r in records),
        "added_by_loading_mb": per_rank(r["after_trim"] - r["before"] for r in records),
        "peak_rss_after_loading_mb": max(r["peak"] for r in records),
        "peak_rss_training_mb": steps_file_peak(run_dir),
        "peak_rss_mb": stats["peak_rss_mb"],
        "wall_s": stats["wall_seconds"],
    }


def main() -> None:
    parser = argument_parser(__doc__, "memory")
    add_size_option(parser, "--hidden", full=1024, quick=256, help="hidden size of the model")
    add_size_option(parser, "--layers", full=12, quick=2, help="decoder layers of the model")
    add_size_option(parser, "--steps", full=4, quick=2, help="optimizer steps per run")
    parser.add_argument("--checkpoint-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="the dtype the model is saved in, which each rank loads (default bfloat16)")
    args = parser.parse_args()
    hidden, layers, steps = args.hidden, args.layers, args.steps

    table = weighted_trajectories(num_prompts=16, k=4)
    if table.num_rows < steps * MICRO_BATCH * WORKERS:
        parser.error(f"--steps {steps} needs {steps * MICRO_BATCH * WORKERS} trajectories; there are {table.num_rows}")
    table = table.slice(0, steps * MICRO_BATCH * WORKERS)
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        model_dir = work_dir / "model"
        parameters = save_model(model_dir, hidden, layers, getattr(torch, args.checkpoint_dtype))
        weighted_dir = work_dir / "weighted"
        weighted_dir.mkdir()
        pq.write_table(table, weighted_dir / "part-0.parquet")
        # Logical CPUs: two 1-CPU workers plus Ray Data's tasks must fit on a 2-core machine.
        with local_ray(num_cpus=4):
            runs = [
                measure(label, stage, partitioned, model_dir, weighted_dir, work_dir, steps)
                for label, stage, partitioned in [
                    ("ZeRO-3 partitioned", 3, True), ("ZeRO-3 whole", 3, False), ("ZeRO-2", 2, False)
                ]
            ]

    model_mb = parameters * 4 / 2**20
    print(
        f"\nweighted SFT, {WORKERS} workers, {steps} steps of {MICRO_BATCH * WORKERS} trajectories; model "
        f"{parameters / 1e6:.1f}M parameters ({model_mb:.0f} MiB in float32), checkpoint in {args.checkpoint_dtype}\n"
    )
    print_table(runs, list(runs[0]))
    config = {
        "hidden": hidden,
        "layers": layers,
        "parameters": parameters,
        "checkpoint_dtype": args.checkpoint_dtype,
        "workers": WORKERS,
        "steps": steps,
        "micro_batch": MICRO_BATCH,
        "quick": args.quick,
    }
    print(f"appended to {append_result('memory', config, runs, args.out)}")


if __name__ == "__main__":
    run_benchmark(main)
