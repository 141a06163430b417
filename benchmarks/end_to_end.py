"""End-to-end wall clock: `pipeline.run_pipeline` on a job config, stage by stage, start-up apart where it can be.

The whole recipe runs in a fresh temporary run_dir, so no stage is skipped as already done; the demo
reference model stays in its cache, so only a first run includes its build. What counts as start-up:
- reference_model (build or load of the reference) and ray_start: all of it;
- weighted_sft: everything but the training steps, from the trainer's own statistics (Ray Train
  workers, DeepSpeed start, tokenisation, the final save);
- rollouts and evaluation: run_pipeline's timings do not split their actors' start-up from generation
  (benchmarks/rollouts.py measures that split), so they count whole as steady state here.
Throughput per stage: generated tokens (of the rollouts, the evaluation's shards, the training's tokens)
over its steady wall time; every round of iterated DRIFT (`rounds`) has rows of its own.

--quick runs jobs/smoke.yaml with a randomly initialised demo-architecture model (no build), which writes
max_new_tokens every turn; --model PATH replaces the config's rollout.model in either mode.

    .venv/bin/python benchmarks/end_to_end.py [--config jobs/demo_cpu.yaml] [--model PATH] [--tmp-dir DIR] [--quick] [--out DIR]
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import add_tmp_dir_option, append_result, argument_parser, print_table, run_benchmark, weight_checksums  # noqa: E402

from drift_ray import schema  # noqa: E402
from drift_ray.config import load_config  # noqa: E402
from drift_ray.demo_model import save_untrained_demo_model  # noqa: E402
from drift_ray.evaluation import comparison_table  # noqa: E402
from drift_ray.pipeline import round_suffix, run_pipeline  # noqa: E402
from drift_ray.rollouts import read_shards  # noqa: E402
from drift_ray.train import read_stats  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STARTUP_STAGES = ("reference_model", "ray_start")


def generated(shard_dirs: list[Path]) -> dict[str, int]:
    tables = [read_shards(d) for d in shard_dirs]
    return {
        "trajectories": sum(t.num_rows for t in tables),
        "completion_tokens": sum(pc.sum(t[schema.COMPLETION_TOKENS]).as_py() for t in tables),
    }


def stage_rows(result: dict[str, Any], mode: str, run_dir: Path, final_multi: dict[str, float]) -> list[dict[str, Any]]:
    """One row per stage of run_pipeline's `result` (its timings_s), with start-up and work where known, for
    every round (the rollouts' figures from the round's summary: what this run generated, wherever
    rollout.output_dir puts it); the evaluation's row also holds `final_multi`, each model's multi@T, so a
    line shows the run trained sensibly."""
    timings = result["timings_s"]
    work: dict[str, dict[str, Any]] = {
        "evaluation": {
            **generated(sorted(p for p in (run_dir / "eval").iterdir() if p.is_dir())),
            "final_multi": final_multi,
        },
    }
    training_s = {}
    for r, round_work in enumerate(result["work_by_round"], start=1):
        suffix = round_suffix(r)
        rollouts = round_work["rollouts"]
        # Absent where the round generated nothing (its prompts all in a shared rollout.output_dir): not measured.
        work[f"rollouts{suffix}"] = {key: rollouts.get(key) for key in ("trajectories", "completion_tokens")}
        stats = read_stats(result["models"][mode + suffix])
        work[f"weighted_sft{suffix}"] = {"tokens": stats["tokens"], "steps": stats["steps"]}
        training_s[f"weighted_sft{suffix}"] = stats["seconds"]
    rows = []
    for stage, seconds in timings.items():
        if stage in STARTUP_STAGES:
            startup = seconds
        elif stage in training_s:
            startup = seconds - training_s[stage]
        else:
            startup = 0.0
        figures = work.get(stage, {})
        steady = seconds - startup
        tokens = figures.get("completion_tokens", figures.get("tokens"))
        rate = tokens / steady if tokens is not None and steady > 0 else None
        rows.append(
            {"stage": stage, "seconds": seconds, "startup_s": startup, "steady_s": steady, **figures,
             "tokens_per_steady_s": rate}
        )
    total = sum(timings.values())
    for r in rows:
        r["share"] = r["seconds"] / total
    rows.append(
        {
            "stage": "total",
            "seconds": total,
            "startup_s": sum(r["startup_s"] for r in rows),
            "steady_s": sum(r["steady_s"] for r in rows),
            "share": 1.0,
        }
    )
    return rows


def main() -> None:
    parser = argument_parser(__doc__, "end_to_end")
    parser.add_argument(
        "--config", type=Path, help="job config (default: jobs/demo_cpu.yaml; --quick: jobs/smoke.yaml)"
    )
    parser.add_argument("--model", help="reference model directory, replacing the config's rollout.model")
    add_tmp_dir_option(parser)
    args = parser.parse_args()
    config_path = args.config or ROOT / "jobs" / ("smoke.yaml" if args.quick else "demo_cpu.yaml")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    with tempfile.TemporaryDirectory(prefix="drift-e2e-bench-", dir=args.tmp_dir) as tmp:
        run_dir = Path(tmp) / "run"
        model = args.model
        if model is None and args.quick:
            model = save_untrained_demo_model(Path(tmp) / "random-demo-model", seed=0)
        overrides = [f"run_dir={run_dir}"] + ([f"rollout.model={model}"] if model else [])
        cfg = load_config(config_path, overrides)
        started = time.perf_counter()
        result = run_pipeline(cfg)
        wall = time.perf_counter() - started
        turns = cfg.episode.max_turns
        final_multi = {label: m[f"multi@{turns}"] for label, m in result["metrics"].items()}
        rows = stage_rows(result, cfg.weights.mode.value, run_dir, final_multi)
        evaluation_table = comparison_table(result["metrics"], turns)
        reference_sha256 = weight_checksums(result["models"]["reference"])

    import ray

    ray.shutdown()
    config = {
        "config": str(config_path),
        "model": "random demo architecture" if args.quick and not args.model else cfg.rollout.model,
        "reference_sha256": reference_sha256,
        "resolved_config": cfg.model_dump(mode="json"),
        "quick": args.quick,
        "prompts": cfg.task.num_train,
        "samples_per_prompt": cfg.rollout.samples_per_prompt,
        "max_turns": cfg.episode.max_turns,
        "rollout_actors": cfg.rollout.num_actors,
        "train_workers": cfg.train.num_workers,
        "wall_s": wall,
    }
    print(f"\nend to end: {config_path.name}, wall {wall:.1f} s (stages sum to {rows[-1]['seconds']:.1f} s)\n")
    columns = ["stage", "seconds", "share", "startup_s", "steady_s", "trajectories", "completion_tokens", "tokens",
               "steps", "tokens_per_steady_s"]
    print_table(rows, columns)
    print(f"\n{evaluation_table}")
    print(f"appended to {append_result('end_to_end', config, rows, args.out)}")


if __name__ == "__main__":
    run_benchmark(main)
