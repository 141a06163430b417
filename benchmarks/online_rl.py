"""Cost of online multi-turn RL against DRIFT: multi@T against wall-clock and generated tokens.

The online baseline (`drift_ray.online_rl`, GRPO advantages, one process on its CPU with the transformers
engine in float32, labelled so) starts from the same reference as DRIFT and regenerates episodes from its
current policy at every update; its greedy multi@1/multi@T (T = episode.max_turns, 5 in the demo) on the
test split is measured every few updates (evaluation time excluded). DRIFT's point is one `drift-ray run`
of the same config: its one-time rollouts plus training, with the tokens its rollouts generated
(`--drift-run DIR` reuses a finished run, from the run.json it wrote; its seed, task, episode, eval.task and
max_new_tokens must be written as in --config; its reference is not compared). Both run on the CPU: a
config that puts DRIFT's rollouts or training on a GPU, or its rollouts on another engine, is refused.
DRIFT's seconds include its start-up (rollout actors loading the model, the training workers and DeepSpeed),
the online baseline's exclude loading the model.

    .venv/bin/python benchmarks/online_rl.py [--config jobs/demo_cpu.yaml] [--updates 150] [--drift-run DIR] [--tmp-dir DIR] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import (  # noqa: E402
    QUICK_PIPELINE_OVERRIDES,
    add_size_option,
    add_tmp_dir_option,
    append_result,
    argument_parser,
    print_table,
    reused_work,
    run_benchmark,
    weight_checksums,
)

from drift_ray.config import Config, EngineKind, load_config, validate_config  # noqa: E402
from drift_ray.demo_model import save_untrained_demo_model  # noqa: E402
from drift_ray.episode import episodes_table, play_episodes  # noqa: E402
from drift_ray.evaluation import episode_metrics  # noqa: E402
from drift_ray.online_rl import OnlineRLSettings, settings_dict, train_online  # noqa: E402
from drift_ray.pipeline import RUN_RECORD_FILE, evaluation_task, resolve_model, run_pipeline  # noqa: E402
from drift_ray.prompts import load_task  # noqa: E402
from drift_ray.rollouts import eval_sampling  # noqa: E402
from drift_ray.trajectories import read_json_object, require_same_settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The settings that make the problems, the episodes and the evaluation: the two methods must share them.
COMPARED = ("seed", "task", "episode", "eval.task", "eval.max_new_tokens", "rollout.max_new_tokens")
ONLINE_LABEL = "online GRPO (single process, CPU, float32)"


def require_comparable_drift(cfg: Config, where: str) -> None:
    """The online baseline runs the transformers engine on the CPU in float32 and trains every weight: DRIFT's
    run must too, or the seconds compare two machines or precisions, and the results two kinds of training."""
    rollout, train = cfg.rollout, cfg.train
    if (rollout.engine is not EngineKind.transformers or rollout.gpus_per_actor or rollout.dtype not in ("auto", "float32")
            or train.use_gpu or train.bf16 or train.lora.enabled):
        raise SystemExit(
            f"{where}: DRIFT must run as the online baseline does, the transformers engine on the CPU in float32, "
            f"training every weight; found rollout.engine={rollout.engine.value}, "
            f"rollout.gpus_per_actor={rollout.gpus_per_actor:g}, rollout.dtype={rollout.dtype}, "
            f"train.use_gpu={str(train.use_gpu).lower()}, train.bf16={str(train.bf16).lower()}, "
            f"train.lora.enabled={str(train.lora.enabled).lower()}"
        )


def drift_point(run_dir: Path, cfg: Config) -> dict[str, Any]:
    """DRIFT's cost and result from a finished run of the problems and episodes of `cfg` (the online
    baseline's): rollouts + weights + training time, rollout tokens."""
    record_path = run_dir / RUN_RECORD_FILE
    if not record_path.exists():
        raise SystemExit(
            f"--drift-run {run_dir}: no {RUN_RECORD_FILE} (not a finished run, or one of an older drift-ray), so "
            "what its last run took over from earlier runs cannot be told. Give --drift-run a run_dir that this "
            "drift-ray ran."
        )
    record = read_json_object(record_path, "give --drift-run a run_dir whose run finished")
    # What the two methods are measured on must be the same; how DRIFT trained is the run's own.
    require_same_settings(
        record_path,
        {"config": cfg.model_dump(mode="json")},
        output=f"--drift-run {run_dir}",
        only=[f"config.{name}" for name in COMPARED],
    )
    cfg = validate_config(record["config"], f"{record_path}: config")
    require_comparable_drift(cfg, str(record_path))
    if reused_work(record["work_by_round"][0], samples_rollouts=True):
        raise SystemExit(
            f"{record_path}: the last run took over work an earlier run did (rollouts, weights, the model or a "
            "checkpoint) or waited for another run's turn at shared rollouts, so its timings are not DRIFT's cost. "
            "Give --drift-run a run_dir whose last run did all the work."
        )
    if "metrics" not in record:
        raise SystemExit(
            f"{record_path}: no metrics (a run of an older drift-ray, whose report eval/eval.json any later "
            "`drift-ray eval` there rewrites), so its evaluation cannot be told. Give --drift-run a run_dir that this "
            "drift-ray ran."
        )
    timings = record["timings_s"]
    metrics = record["metrics"][cfg.weights.mode.value]
    # The run's own: a shared rollout.output_dir also holds other runs' prompts.
    tokens = record["work_by_round"][0]["rollouts"]["completion_tokens"]
    return {
        "method": f"DRIFT ({cfg.weights.mode.value}, Ray pipeline)",
        "seconds": round(timings["rollouts"] + timings["weights"] + timings["weighted_sft"], 1),
        "generated_tokens": int(tokens),
        "multi@1": metrics["multi@1"],
        f"multi@{cfg.episode.max_turns}": metrics[f"multi@{cfg.episode.max_turns}"],
    }


def main() -> None:
    parser = argument_parser(__doc__, "online_rl")
    parser.add_argument("--config", type=Path, default=ROOT / "jobs" / "demo_cpu.yaml",
                        help="the config of both methods (default: jobs/demo_cpu.yaml)")
    add_size_option(parser, "--updates", full=150, quick=2, help="online updates, each on episodes played anew")
    add_size_option(parser, "--prompts-per-update", full=32, quick=2, help="training problems each update plays")
    add_size_option(parser, "--samples-per-prompt", full=8, quick=2, least=2,
                    help="episodes per problem and update, the group its advantages are taken in")
    parser.add_argument("--lr", type=finite_rate, default=1e-4, help="the online baseline's AdamW learning rate (default 1e-4)")
    add_size_option(parser, "--eval-every", full=25, quick=1, help="updates between evaluations")
    parser.add_argument("--drift-run", type=Path, default=None, help="a finished `drift-ray run` of --config to compare with")
    add_tmp_dir_option(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    overrides = QUICK_PIPELINE_OVERRIDES if args.quick else []
    settings = OnlineRLSettings(
        updates=args.updates,
        prompts_per_update=args.prompts_per_update,
        samples_per_prompt=args.samples_per_prompt,
        lr=args.lr,
        eval_every=args.eval_every,
    )
    with tempfile.TemporaryDirectory(prefix="drift-online-", dir=args.tmp_dir) as tmp:
        cfg = load_config(args.config, [*overrides, f"run_dir={Path(tmp) / 'drift'}"])
        require_comparable_drift(cfg, str(args.config))
        # A --drift-run that cannot be compared is refused now, not after the online updates.
        drift = None if args.drift_run is None else drift_point(args.drift_run, cfg)
        reference = save_untrained_demo_model(Path(tmp) / "untrained") if args.quick else resolve_model(cfg.rollout.model, cfg)
        cfg.rollout.model = reference
        reference_sha256 = weight_checksums(reference)  # while a --quick reference still exists
        task = load_task(cfg.task, cfg.seed)
        eval_task = evaluation_task(cfg, task)  # as DRIFT's run evaluates: eval.task when set
        eval_verifier = eval_task.new_verifier()
        max_turns = cfg.episode.max_turns

        def evaluate(engine) -> dict[str, float]:
            episodes = play_episodes(eval_task.test, engine, eval_verifier, eval_sampling(cfg), 1, cfg.episode)
            metrics = episode_metrics(episodes_table(episodes, cfg.episode, engine.name), max_turns)
            return {"multi@1": metrics["multi@1"], f"multi@{max_turns}": metrics[f"multi@{max_turns}"]}

        model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32)  # as weighted SFT loads it
        tokenizer = AutoTokenizer.from_pretrained(reference)
        curve = train_online(model, tokenizer, task.train, task.new_verifier(), cfg, settings, evaluate)
        rows = [{"method": f"{ONLINE_LABEL}, update {p['update']}", **p} for p in curve]

        if drift is None:
            run_pipeline(cfg)
            drift = drift_point(Path(cfg.run_dir), cfg)
        rows.append(drift)
    print_table(rows, ["method", "seconds", "generated_tokens", "multi@1", f"multi@{max_turns}"])
    appended = append_result(
        "online_rl",
        {"config": str(args.config), "quick": args.quick, "settings": settings_dict(settings), "reference": reference,
         "reference_sha256": reference_sha256, "drift_run": None if args.drift_run is None else str(args.drift_run),
         "resolved_config": cfg.model_dump(mode="json")},
        rows,
        args.out,
    )
    print(f"appended to {appended}")


def finite_rate(value: str) -> float:
    """An argparse type: a finite number of at least 0."""
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 <= rate < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a finite number of at least 0")
    return rate


if __name__ == "__main__":
    run_benchmark(main)
