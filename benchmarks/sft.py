"""Weighted SFT throughput: Ray Train + DeepSpeed ZeRO-2/3 with 1 and 2 workers against a plain loop, and padding.

Data needs no model: the scripted CandidatesTeacher plays the built-in candidates task (`play_episodes`)
and `compute_weights` weighs the trajectories. Every run trains the demo architecture from the same random
initialisation on the same trajectories with the same micro-batch size:
- plain: `weighted_sft.fit_plain` in this process, one torch thread (what one 1-CPU worker gets);
- Ray Train: `train.train_weighted_sft` per ZeRO stage and worker count, one CPU and thread per worker.
Throughput counts non-padding tokens. Ray Train's wall time splits into:
- train_s: its own `seconds`, the time inside its optimizer steps (the first epoch's tokenization
  included, which the plain loop does before its clock starts); `tokens_per_s` is tokens / train_s;
- report_s: time the workers sit blocked in `ray.train.report`, measured here by wrapping it (Ray
  Train takes one report per worker every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default, which is
  why train_loop reports only checkpoints and the end, and logs the steps in between);
  `effective_tokens_per_s` is tokens / (train_s + report_s);
- startup_s: the rest (Ray Data read, worker, model and DeepSpeed start, saving the model).
`vs_plain` compares effective throughput. Padding: the share of padding tokens in random batches, in
`length_buckets` batches (fit_plain) and in the micro-batches of `plan_steps` (Ray Train).

    .venv/bin/python benchmarks/sft.py [--prompts 64] [--k 8] [--micro-batch 32] [--quick] [--out DIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import add_size_option, append_result, argument_parser, local_ray, print_table, run_benchmark, whole_number  # noqa: E402

from drift_ray import schema  # noqa: E402
from drift_ray.builtin_tasks import CandidatesTeacher, candidates_task  # noqa: E402
from drift_ray.config import Config, ExampleKind, LossKind, TrainConfig, WeightsConfig  # noqa: E402
from drift_ray.demo_model import DEMO_EPISODE, build_tokenizer, save_untrained_demo_model  # noqa: E402
from drift_ray.episode import SamplingParams, episodes_table, play_episodes  # noqa: E402
from drift_ray.train import plan_steps, train_loop, train_weighted_sft  # noqa: E402
from drift_ray.weighted_sft import fit_plain, length_buckets, tokenize_trajectory  # noqa: E402
from drift_ray.weights import compute_weights  # noqa: E402

TARGET_ONE_WORKER_VS_PLAIN = 0.9
TARGET_PADDING = 0.10
SEED = 0
LR = 1e-3
MAX_LENGTH = 512


def weighted_trajectories(num_prompts: int, k: int) -> pa.Table:
    """K teacher episodes per candidates problem, weighted; only rows of positive weight, as training keeps."""
    task = candidates_task(seed=SEED, num_train=num_prompts)
    teacher = CandidatesTeacher()
    verifier = task.new_verifier()
    episodes = play_episodes(task.train, teacher, verifier, SamplingParams(seed=SEED), k, DEMO_EPISODE)
    weighted = compute_weights(episodes_table(episodes, DEMO_EPISODE, teacher.name), WeightsConfig())
    return weighted.filter(pc.greater(weighted.column(schema.WEIGHT), 0))


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Padding tokens / all tokens when every batch is right-padded to its longest sequence."""
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1.0 - real / padded


def measure_padding(
    conversations: list[list[dict[str, str]]], weights: list[float], micro_batch: int
) -> tuple[list[dict[str, Any]], float]:
    """Padding of the three ways to batch, and the seconds it took to tokenize every example once."""
    tokenizer = build_tokenizer()
    started = time.perf_counter()
    examples = [tokenize_trajectory(tokenizer, m, ExampleKind.last_turn, MAX_LENGTH) for m in conversations]
    tokenize_s = time.perf_counter() - started
    lengths = [len(example.input_ids) for example in examples]
    order = np.random.default_rng(SEED).permutation(len(lengths))
    random_batches = [order[i : i + micro_batch].tolist() for i in range(0, len(order), micro_batch)]
    # Ray Train orders by characters, not tokens (see train_loop); its padding is counted in tokens all the same.
    characters = [sum(len(message["content"]) for message in messages) for messages in conversations]
    plan = plan_steps(
        characters,
        weights,
        global_batch_size=micro_batch,
        micro_batch_size=micro_batch,
        world_size=1,
        epochs=1,
        seed=SEED,
        loss=LossKind.sample_mean,
    )
    planned = [micro.indices for step in plan for rank in step.micro_batches for micro in rank if not micro.filler]
    batchings = {
        "random batches": random_batches,
        "length_buckets (fit_plain)": length_buckets(lengths, micro_batch, (SEED, 0)),
        "plan_steps micro-batches (Ray Train)": planned,
    }
    rows = [{"batching": name, "padding_fraction": padding_fraction(b, lengths)} for name, b in batchings.items()]
    return rows, tokenize_s


def run_row(
    run: str, workers: int, zero_stage: int | None, stats: dict[str, Any], report_s: float | None = None
) -> dict[str, Any]:
    """The figures of one training run; `stats` as fit_plain and train_weighted_sft both return them."""
    blocked = report_s or 0.0
    return {
        "run": run,
        "workers": workers,
        "zero_stage": zero_stage,
        "steps": stats["steps"],
        "tokens": stats["tokens"],
        "startup_s": stats["wall_seconds"] - stats["seconds"] - blocked if "wall_seconds" in stats else None,
        "train_s": stats["seconds"],
        "report_s": report_s,
        "tokens_per_s": stats["tokens_per_s"],
        "effective_tokens_per_s": stats["tokens"] / (stats["seconds"] + blocked),
    }


def report_timing_loop(timing_file: str) -> Callable[[dict[str, Any]], None]:
    """train_loop with the seconds spent inside ray.train.report written by rank 0 to `timing_file` (JSON).

    A wrapper, so that train.py stays as it is: train_loop calls ray.train.report through the module
    attribute, which the wrapper replaces in the worker process for the length of the loop.
    """

    def loop(config: dict[str, Any]) -> None:
        import ray.train

        report = ray.train.report
        blocked = {"seconds": 0.0, "calls": 0}

        def timed_report(*args: Any, **kwargs: Any) -> None:
            started = time.perf_counter()
            try:
                report(*args, **kwargs)
            finally:
                blocked["seconds"] += time.perf_counter() - started
                blocked["calls"] += 1

        ray.train.report = timed_report
        try:
            train_loop(config)
        finally:
            ray.train.report = report
        if ray.train.get_context().get_world_rank() == 0:
            Path(timing_file).write_text(json.dumps(blocked))

    return loop


def measure_plain(
    model_dir: str, conversations: list[list[dict[str, str]]], weights: list[float], micro_batch: int
) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stats = fit_plain(
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            build_tokenizer(),
            conversations,
            weights,
            kind=ExampleKind.last_turn,
            loss=LossKind.sample_mean,
            lr=LR,
            epochs=1,
            batch_size=micro_batch,
            max_length=MAX_LENGTH,
            seed=SEED,
        )
    finally:
        torch.set_num_threads(threads)
    return run_row("plain loop (fit_plain, 1 thread)", 1, None, stats)


def measure_ray_train(
    model_dir: str, weighted_dir: str, work_dir: Path, micro_batch: int, zero_stage: int, workers: int
) -> dict[str, Any]:
    train = TrainConfig(
        num_workers=workers,
        cpus_per_worker=1,
        zero_stage=zero_stage,
        global_batch_size=micro_batch * workers,
        micro_batch_size=micro_batch,
        lr=LR,
        warmup_ratio=0.0,
        weight_decay=0.0,
        epochs=1,
        max_length=MAX_LENGTH,
        examples=ExampleKind.last_turn,
        loss=LossKind.sample_mean,
    )
    out_dir = work_dir / f"zero{zero_stage}-workers{workers}"
    timing_file = work_dir / f"zero{zero_stage}-workers{workers}.report.json"
    stats = train_weighted_sft(
        Config(seed=SEED, train=train),
        weighted_dir,
        model_dir,
        str(out_dir),
        train_loop_per_worker=report_timing_loop(str(timing_file)),
    )
    report_s = json.loads(timing_file.read_text())["seconds"]
    return run_row(f"Ray Train + DeepSpeed ZeRO-{zero_stage}", workers, zero_stage, stats, report_s)


def main() -> None:
    parser = argument_parser(__doc__, "sft")
    add_size_option(parser, "--prompts", full=64, quick=16, help="candidates problems")
    add_size_option(parser, "--k", full=8, quick=4, help="trajectories per problem")
    parser.add_argument("--micro-batch", type=whole_number(1), default=32,
                        help="sequences per forward pass (per worker; default 32)")
    args = parser.parse_args()
    num_prompts, k = args.prompts, args.k
    # --quick: one Ray Train run shows the path works; the full run covers ZeRO-2/3 × 1/2 workers.
    ray_runs = [(2, 1)] if args.quick else [(2, 1), (3, 1), (2, 2), (3, 2)]

    table = weighted_trajectories(num_prompts, k)
    conversations = table.column(schema.MESSAGES).to_pylist()
    weights = table.column(schema.WEIGHT).to_pylist()
    padding, tokenize_s = measure_padding(conversations, weights, args.micro_batch)

    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        model_dir = save_untrained_demo_model(work_dir / "model", seed=SEED)
        weighted_dir = work_dir / "weighted"
        weighted_dir.mkdir()
        pq.write_table(table, weighted_dir / "part-0.parquet")
        runs = [measure_plain(model_dir, conversations, weights, args.micro_batch)]
        # Logical CPUs: two 1-CPU workers plus Ray Data's tasks must fit on a 2-core machine.
        with local_ray(num_cpus=4):
            for zero_stage, workers in ray_runs:
                run = measure_ray_train(model_dir, str(weighted_dir), work_dir, args.micro_batch, zero_stage, workers)
                runs.append(run)

    for run in runs:
        run["vs_plain"] = run["effective_tokens_per_s"] / runs[0]["effective_tokens_per_s"]
    print(
        f"\nweighted SFT, {table.num_rows} trajectories ({num_prompts} prompts × K={k}), micro-batch "
        f"{args.micro_batch}, demo architecture (random init); tokenizing every example takes {tokenize_s:.2f} s\n"
    )
    columns = ["run", "workers", "zero_stage", "steps", "tokens", "startup_s", "train_s", "report_s", "tokens_per_s"]
    print_table(runs, columns + ["effective_tokens_per_s", "vs_plain"])
    print()
    print_table(padding, ["batching", "padding_fraction"])
    plain_rate = runs[0]["tokens_per_s"]
    one_worker = ", ".join(
        f"{r['vs_plain']:.2f}x (ZeRO-{r['zero_stage']}; {r['tokens_per_s'] / plain_rate:.2f}x inside the steps)"
        for r in runs[1:]
        if r["workers"] == 1
    )
    bucketed = ", ".join(f"{r['padding_fraction']:.1%} ({r['batching']})" for r in padding[1:])
    print(f"\ntarget: 1 worker >= {TARGET_ONE_WORKER_VS_PLAIN}x the plain loop; measured {one_worker}")
    print(f"target: padding <= {TARGET_PADDING:.0%} with length bucketing; measured {bucketed}")
    config = {
        "prompts": num_prompts,
        "k": k,
        "trajectories": table.num_rows,
        "micro_batch": args.micro_batch,
        "max_length": MAX_LENGTH,
        "model": "demo tiny, random init",
        "tokenize_s": tokenize_s,
        "quick": args.quick,
    }
    print(f"appended to {append_result('sft', config, runs + padding, args.out)}")


if __name__ == "__main__":
    run_benchmark(main)
