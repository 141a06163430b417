"""Weights stage throughput: the pure core against a per-row Python loop, the file entry (Parquet or JSONL
in) and the Ray Data map stage.

The loop computes the same formula the way the authors' release does: row by row, one dict per prompt. It
is timed on rows already in Python (its best case) and with the Arrow → Python conversion of the columns it
reads (what a per-row map stage over Arrow blocks would pay). Core and loop must agree before anything is
timed. In-process figures are the best of a few repeats; the Ray Data stage runs once after a warm-up.

    .venv/bin/python benchmarks/weights.py [--trajectories 100000] [--k 16] [--reply-chars 0] [--no-ray] [--quick] [--out DIR]
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import add_size_option, append_result, argument_parser, local_ray, print_table, run_benchmark, whole_number  # noqa: E402

from drift_ray import schema  # noqa: E402
from drift_ray.config import EpisodeConfig, WeightsConfig  # noqa: E402
from drift_ray.weights import add_weights, compute_weights, weights_file  # noqa: E402

TARGET_SPEEDUP = 50.0  # core vs the loop on Python rows
TARGET_RAY_PER_MIN = 1_000_000  # trajectories per minute through the Ray Data map stage
ANSWERS_PER_PROMPT = 4  # distinct answers a prompt's trajectories choose from: repeats within a row are common
PROMPTS_PER_BLOCK = 32  # rollout output: one block per actor call of rollout.prompts_per_batch prompts


FEEDBACK = EpisodeConfig().feedback
REASONING = "Let me think again: 3 × 4 = 12, so the last digit is 2. "  # not all ASCII: the UTF-8 check has work


def synthetic_trajectories(n: int, k: int, seed: int, reply_chars: int = 0) -> pa.Table:
    """n trajectories, k per prompt: 1–5 turns, 40% solved at their last turn, 5% format failures per turn.
    One reply per turn, feedback between them; each carries `reply_chars` characters of reasoning before
    its answer: the weights read none of it, but the file entry reads and checks all of it."""
    rng = np.random.default_rng(seed)
    reasoning = (REASONING * (reply_chars // len(REASONING) + 1))[:reply_chars]
    turns = rng.integers(1, 6, size=n)
    solved = rng.random(n) < 0.4
    rows = []
    for i in range(n):
        prompt, t = i // k, int(turns[i])
        rewards = [0.0] * t
        if solved[i]:
            rewards[-1] = 1.0
        answers = [str(prompt * ANSWERS_PER_PROMPT + a) for a in rng.integers(0, ANSWERS_PER_PROMPT, size=t)]
        failures = (rng.random(t) < 0.05).tolist()
        messages = [{"role": "user", "content": "question"}]
        for turn in range(t):
            if turn:
                messages.append({"role": "user", "content": FEEDBACK})
            messages.append({"role": "assistant", "content": f"{reasoning}<answer>1</answer>"})
        rows.append({
            schema.PROMPT_ID: f"p{prompt}",
            schema.TRAJECTORY_ID: f"p{prompt}/{i % k}",
            schema.TURN_REWARDS: rewards,
            schema.ANSWER_NORMS: [a for a, failed in zip(answers, failures) if not failed],
            schema.FORMAT_FAILURES: failures,
            schema.FORMAT_PENALTY: -0.1 * sum(failures),
            schema.T_STAR: t if solved[i] else None,
            schema.MESSAGES: messages,
        })
    return pa.Table.from_pylist(rows)


def per_row_loop(rows: list[dict[str, Any]], cfg: WeightsConfig) -> list[float]:
    """The weights of `compute_weights` (mode drift, recorded format penalties), row by row."""
    groups: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for i, row in enumerate(rows):
        ret = sum(cfg.gamma**t * r for t, r in enumerate(row[schema.TURN_REWARDS])) + row[schema.FORMAT_PENALTY]
        answers = [a for a in row[schema.ANSWER_NORMS] if a and a.strip()]
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


def per_row_loop_from_arrow(table: pa.Table, cfg: WeightsConfig) -> list[float]:
    return per_row_loop(table.select(list(schema.WEIGHTS_INPUT)).to_pylist(), cfg)


def best_seconds(repeats: int, fn: Callable[..., Any], *args: Any) -> float:
    """The fastest of `repeats` runs: the one least disturbed by other load on the machine."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


def throughput(path: str, n: int, seconds: float) -> dict[str, Any]:
    rate = n / seconds
    return {"path": path, "seconds": seconds, "trajectories_per_s": rate, "trajectories_per_min": 60 * rate}


def measure_in_process(table: pa.Table, cfg: WeightsConfig, repeats: int) -> list[dict[str, Any]]:
    n = table.num_rows
    core_weights = compute_weights(table, cfg).column(schema.WEIGHT).to_numpy()
    rows = table.to_pylist()
    for label, weights in (("Python rows", per_row_loop(rows, cfg)), ("Arrow", per_row_loop_from_arrow(table, cfg))):
        if not np.allclose(core_weights, weights, rtol=1e-9, atol=1e-12):
            worst = int(np.argmax(np.abs(core_weights - np.asarray(weights))))
            raise SystemExit(
                f"compute_weights and the per-row loop on {label} disagree: row {worst} gets {core_weights[worst]} "
                f"from the core and {weights[worst]} from the loop"
            )

    core_s = best_seconds(repeats, compute_weights, table, cfg)
    loop_s = best_seconds(max(1, repeats // 2), per_row_loop, rows, cfg)
    arrow_loop_s = best_seconds(max(1, repeats // 2), per_row_loop_from_arrow, table, cfg)
    core = throughput("pure core (compute_weights)", n, core_s)
    core |= {"speedup_vs_loop": loop_s / core_s, "speedup_vs_loop_from_arrow": arrow_loop_s / core_s}
    results = [
        core,
        throughput("per-row loop on Python rows", n, loop_s),
        throughput("per-row loop incl. Arrow -> Python rows", n, arrow_loop_s),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.parquet"
        pq.write_table(table, source)
        file_s = best_seconds(repeats, weights_file, source, Path(tmp) / "out.parquet", cfg)
        # JSONL, as the authors' rollouts come: read line by line, each line checked in Python.
        lines = Path(tmp) / "in.jsonl"
        lines.write_text("".join(json.dumps(row) + "\n" for row in rows))
        jsonl_s = best_seconds(max(1, repeats // 3), weights_file, lines, Path(tmp) / "out.parquet", cfg)
    results.append(throughput("drift-ray weights (Parquet in/out)", n, file_s))
    results.append(throughput("drift-ray weights (JSONL in, Parquet out)", n, jsonl_s))
    return results


def measure_ray_data(table: pa.Table, cfg: WeightsConfig, k: int) -> list[dict[str, Any]]:
    """add_weights over blocks shaped like rollout output (whole groups), as given and hash-repartitioned,
    each block checked to hold whole groups of K, as the pipeline has it checked."""
    import ray.data

    with local_ray(num_cpus=2):
        rows_per_block = PROMPTS_PER_BLOCK * k
        blocks = [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]
        ds = ray.data.from_arrow(blocks).materialize()
        add_weights(ray.data.from_arrow(blocks[:2]), cfg, whole_groups=False).materialize()  # start the workers
        results = []
        for whole_groups in (True, False):
            start = time.perf_counter()
            add_weights(ds, cfg, whole_groups=whole_groups, group_size=k).materialize()
            blocks_are = "whole groups per block" if whole_groups else "hash repartition by prompt"
            results.append(throughput(f"Ray Data map stage, {blocks_are}", table.num_rows, time.perf_counter() - start))
        return results


def main() -> None:
    parser = argument_parser(__doc__, "weights")
    add_size_option(parser, "--trajectories", full=100_000, quick=4_000, help="synthetic trajectories, K per prompt")
    parser.add_argument("--k", type=whole_number(1), default=16, help="trajectories per prompt (default 16)")
    parser.add_argument("--reply-chars", type=whole_number(0), default=0,
                        help="characters of reasoning before each reply's answer (default 0)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Data measurement")
    args = parser.parse_args()
    n = args.trajectories
    if n % args.k:
        # Each prompt's K trajectories make one group, which the weights normalise over.
        parser.error(f"argument --trajectories: {n:,} is not a multiple of --k {args.k}")
    repeats = 2 if args.quick else 6
    cfg = WeightsConfig()
    table = synthetic_trajectories(n, args.k, seed=0, reply_chars=args.reply_chars)

    results = measure_in_process(table, cfg, repeats)
    if not args.no_ray:
        results += measure_ray_data(table, cfg, args.k)

    print(f"\nweights stage, {n:,} trajectories, K={args.k}, {args.reply_chars:,} characters of reasoning per reply\n")
    columns = ["path", "seconds", "trajectories_per_s", "trajectories_per_min", "speedup_vs_loop"]
    print_table(results, columns + ["speedup_vs_loop_from_arrow"])
    speedup = results[0]["speedup_vs_loop"]
    print(f"\ntarget: core >= {TARGET_SPEEDUP:.0f}x the loop on Python rows; measured {speedup:.1f}x")
    ray_rates = [r["trajectories_per_min"] for r in results if r["path"].startswith("Ray Data")]
    if ray_rates:
        slower = min(ray_rates)
        print(f"target: Ray Data >= {TARGET_RAY_PER_MIN:,} trajectories/min; measured {slower:,.0f} (the slower path)")
    config = {
        "trajectories": n, "k": args.k, "reply_chars": args.reply_chars, "repeats": repeats, "ray": not args.no_ray,
        "quick": args.quick,
    }
    print(f"appended to {append_result('weights', config, results, args.out)}")


if __name__ == "__main__":
    run_benchmark(main)
