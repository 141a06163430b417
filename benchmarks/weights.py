"""Weights stage throughput: the pure core, `drift-ray weights` on files, the Ray Data map stage, and a
per-row Python loop computing the same formula the way the authors' release does (rows, dict per prompt).

    .venv/bin/python benchmarks/weights.py [--trajectories 100000] [--quick] [--no-ray]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import append_result, print_table  # noqa: E402

from drift_ray import schema  # noqa: E402
from drift_ray.config import WeightsConfig  # noqa: E402
from drift_ray.weights import add_weights, compute_weights, weights_file  # noqa: E402


def synthetic_trajectories(n: int, k: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    turns = rng.integers(1, 6, size=n)
    solved = rng.random(n) < 0.4
    rows = []
    for i in range(n):
        t = int(turns[i])
        rewards = [0.0] * t
        if solved[i]:
            rewards[-1] = 1.0
        answers = [str(a) for a in rng.integers(0, 4, size=t)]
        failures = (rng.random(t) < 0.05).tolist()
        rows.append({
            schema.PROMPT_ID: f"p{i // k}",
            schema.TRAJECTORY_ID: f"p{i // k}/{i % k}",
            schema.TURN_REWARDS: rewards,
            schema.ANSWER_NORMS: [a for a, f in zip(answers, failures) if not f],
            schema.FORMAT_FAILURES: failures,
            schema.FORMAT_PENALTY: -0.1 * sum(failures),
            schema.T_STAR: t if solved[i] else None,
            schema.MESSAGES: [{"role": "user", "content": "question"}, {"role": "assistant", "content": "<answer>1</answer>"}],
        })
    return pa.Table.from_pylist(rows)


def per_row_loop(rows: list[dict], cfg: WeightsConfig) -> list[float]:
    """The reference formula, row by row, as the authors' scripts compute it."""
    groups: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for i, row in enumerate(rows):
        ret = sum(cfg.gamma**t * r for t, r in enumerate(row[schema.TURN_REWARDS])) + row[schema.FORMAT_PENALTY]
        answers = [a for a in row[schema.ANSWER_NORMS] if a]
        if answers:
            ret -= cfg.rep_lambda * (1 - len(set(answers)) / len(answers))
        groups[row[schema.PROMPT_ID]].append((i, ret))
    weights = [0.0] * len(rows)
    for items in groups.values():
        top = max(r for _, r in items)
        exps = [math.exp((r - top) / cfg.beta) for _, r in items]
        mean = sum(exps) / len(exps)
        for (i, _), e in zip(items, exps):
            weights[i] = e / mean
    return weights


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="20k trajectories")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Data measurement")
    args = parser.parse_args()
    n = 20_000 if args.quick else args.trajectories
    cfg = WeightsConfig()
    table = synthetic_trajectories(n, args.k, seed=0)
    results = []

    weighted, core_s = timed(compute_weights, table, cfg)
    results.append({"path": "pure core (compute_weights)", "seconds": core_s, "trajectories_per_s": n / core_s})
    loop_weights, loop_s = timed(per_row_loop, table.to_pylist(), cfg)
    results.append({"path": "per-row Python loop", "seconds": loop_s, "trajectories_per_s": n / loop_s})
    if not np.allclose(weighted[schema.WEIGHT].to_numpy(), loop_weights, rtol=1e-9, atol=1e-12):
        raise SystemExit("the core and the per-row loop disagree")
    results[0]["speedup_vs_loop"] = loop_s / core_s

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.parquet"
        pq.write_table(table, src)
        _, file_s = timed(weights_file, src, Path(tmp) / "out.parquet", cfg)
        results.append({"path": "drift-ray weights (Parquet in/out)", "seconds": file_s, "trajectories_per_s": n / file_s})

    if not args.no_ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = ray.data.from_arrow(table).materialize()
        for whole_groups in (True, False):
            start = time.perf_counter()
            add_weights(ds, cfg, whole_groups=whole_groups).materialize()
            seconds = time.perf_counter() - start
            label = "Ray Data map stage" + (" (whole groups per block)" if whole_groups else " (hash repartition by prompt)")
            results.append({"path": label, "seconds": seconds, "trajectories_per_s": n / seconds,
                            "trajectories_per_min": 60 * n / seconds})
        ray.shutdown()

    print(f"\nweights stage, {n:,} trajectories, K={args.k}\n")
    print_table(results, ["path", "seconds", "trajectories_per_s", "trajectories_per_min", "speedup_vs_loop"])
    print(f"\nappended to {append_result('weights', {'trajectories': n, 'k': args.k}, results)}")


if __name__ == "__main__":
    main()
