"""Quality: DRIFT against SFT on all trajectories (uniform) and RFT (success_only), from one reference, over seeds.

For every seed the reference's rollouts are sampled once (seeded) and shared by the three weighting
modes, which differ only from the weights stage on (`rollout.output_dir`); each mode then trains and is
evaluated greedily on the test split by `pipeline.run_pipeline`. The reference is resolved once, so
every seed and mode starts from the same model. Prints mean ± std over seeds of multi@1/3/5, the
unique-answer ratio and the correction rate at turn 2, the wall-clock per stage, and the checks of the
evidence issue computed from these numbers; writes a JSON line and a plot of multi@k per method.

    .venv/bin/python benchmarks/quality.py [--config jobs/demo_cpu.yaml] [--seeds 0 1 2] [--quick] [--out DIR]
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import QUICK_PIPELINE_OVERRIDES, append_result, argument_parser, print_table  # noqa: E402

from drift_ray.config import WeightMode, load_config  # noqa: E402
from drift_ray.demo_model import save_untrained_demo_model  # noqa: E402
from drift_ray.evaluation import plot_cumulative_accuracy  # noqa: E402
from drift_ray.pipeline import resolve_model, run_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "reference"
METRICS = ["multi@1", "multi@3", "multi@5", "unique_answer_ratio_all", "correction@2"]
STAGES = ["rollouts", "weights", "weighted_sft", "evaluation"]


def run_method(config: Path, overrides: list[str], seed: int, mode: str, work: Path, reference: str) -> dict[str, Any]:
    """One seed × weighting mode through the whole pipeline; its metrics and per-stage wall-clock."""
    cfg = load_config(
        config,
        [
            *overrides,
            f"seed={seed}",
            f"weights.mode={mode}",
            f"rollout.model={reference}",
            f"run_dir={work / f'seed{seed}' / mode}",
            f"rollout.output_dir={work / f'seed{seed}' / 'rollouts'}",
        ],
    )
    result = run_pipeline(cfg)
    return {"metrics": result["metrics"], "timings_s": result["timings_s"]}


def mean_std(values: list[float | None]) -> tuple[float, float]:
    """Over the seeds where the metric is defined (None, e.g. a ratio of no answers, is left out)."""
    defined = [v for v in values if v is not None]
    if not defined:
        return float("nan"), float("nan")
    return float(np.mean(defined)), float(np.std(defined, ddof=1)) if len(defined) > 1 else 0.0


def metrics_by_method(runs: dict[tuple[int, str], dict[str, Any]], seeds: list[int], modes: list[str]) -> dict[str, list[dict[str, Any]]]:
    """method → its metrics per seed; the reference's come from the first mode's run of each seed."""
    methods = {REFERENCE: [runs[(seed, modes[0])]["metrics"][REFERENCE] for seed in seeds]}
    methods.update({mode: [runs[(seed, mode)]["metrics"][mode] for seed in seeds] for mode in modes})
    return methods


def summary_rows(runs: dict[tuple[int, str], dict[str, Any]], seeds: list[int], modes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for method, metrics in metrics_by_method(runs, seeds, modes).items():
        row: dict[str, Any] = {"method": method, "seeds": len(metrics)}
        for key in METRICS:
            values = [(m["correction_rate"].get("2") or 0.0) if key == "correction@2" else m[key] for m in metrics]
            mean, std = mean_std(values)
            row[key] = f"{mean:.3f} ± {std:.3f}"
            row[f"{key}_mean"], row[f"{key}_std"] = mean, std
        if method != REFERENCE:
            for stage in STAGES:
                row[f"{stage}_s"] = round(float(np.mean([runs[(seed, method)]["timings_s"][stage] for seed in seeds])), 1)
        rows.append(row)
    return rows


def evidence_checks(rows: list[dict[str, Any]]) -> list[str]:
    """The evidence issue's criteria, computed from the measured means and stds."""
    row_of = {row["method"]: row for row in rows}
    base = row_of[REFERENCE]
    checks = [f"reference greedy multi@5 − acc@1 = {base['multi@5_mean'] - base['multi@1_mean']:+.3f}"]
    if "drift" in row_of:
        drift = row_of["drift"]
        checks.append(f"DRIFT multi@5 − acc@1 = {drift['multi@5_mean'] - drift['multi@1_mean']:+.3f}")
        if "uniform" in row_of:
            sft = row_of["uniform"]
            gap = drift["multi@5_mean"] - sft["multi@5_mean"]
            noise = 2 * max(drift["multi@5_std"], sft["multi@5_std"])
            checks.append(f"DRIFT multi@5 − SFT multi@5 = {gap:+.3f}; 2 × the larger seed std = {noise:.3f}: "
                          f"{'beyond' if gap > noise else 'NOT beyond'} seed noise")
    return checks


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--config", type=Path, default=ROOT / "jobs" / "demo_cpu.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=[m.value for m in WeightMode], choices=[m.value for m in WeightMode])
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the runs here (default: a temporary dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = QUICK_PIPELINE_OVERRIDES if args.quick else []
    seeds = args.seeds[:1] if args.quick else args.seeds
    # An untrained model never answers correctly (success_only would have nothing to train on), and the
    # smoke test checks the plumbing: one seed of DRIFT is enough.
    modes = ["drift"] if args.quick else args.modes
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="drift-quality-") as tmp:
        work = args.work_dir or Path(tmp)
        base = load_config(args.config, overrides)
        if args.quick:  # plumbing only: an untrained model instead of building the demo reference
            reference = save_untrained_demo_model(work / "untrained-reference")
        else:
            reference = resolve_model(base.rollout.model, base)  # one reference for every seed and mode
        runs = {
            (seed, mode): run_method(args.config, overrides, seed, mode, work, reference)
            for seed in seeds
            for mode in modes
        }
        rows = summary_rows(runs, seeds, modes)
        print_table(rows, ["method", "seeds", *METRICS, *(f"{stage}_s" for stage in STAGES)])
        print("(rollouts_s: the first mode of a seed samples them, the others reuse them; "
              "evaluation_s covers the reference and the trained model)")
        # --quick leaves no plot behind: its results directory holds the JSON line alone.
        plot = (work if args.quick else args.out) / "quality.png"
        max_turns = base.episode.max_turns
        curves = {
            method: {f"multi@{k}": float(np.mean([m[f"multi@{k}"] for m in metrics])) for k in range(1, max_turns + 1)}
            for method, metrics in metrics_by_method(runs, seeds, modes).items()
        }
        plot_cumulative_accuracy(curves, max_turns, plot, title=f"multi@k, mean of {len(seeds)} seed(s)")
        print(f"plot: {plot}")
    checks = evidence_checks(rows)
    print("\n".join(checks))
    append_result(
        "quality",
        {"config": str(args.config), "seeds": seeds, "modes": modes, "quick": args.quick, "reference": reference},
        [{k: v for k, v in row.items() if not (isinstance(v, str) and k != "method")} for row in rows],
        args.out,
    )


if __name__ == "__main__":
    main()
