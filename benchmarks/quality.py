"""Quality: DRIFT against SFT on all trajectories (uniform) and RFT (success_only), from one reference, over seeds.

For every seed the reference's rollouts are sampled once (seeded) and shared by every method, which
differ only from the weights stage on (`rollout.output_dir`): DRIFT at the config's β, DRIFT at each
`--betas` value, SFT and RFT. Every mode at the config's β also runs `--rounds` rounds (round r collects
from round r−1's policy: iterated DRIFT, and SFT/RFT iterated the same way, so that the effect of a
second round can be told from the effect of the weights), and every round's model is a row. Each
method trains and is evaluated greedily on the test split by `pipeline.run_pipeline`. The reference is resolved once, so
every seed and method starts from the same model. Prints mean ± std over seeds of multi@1/3/5, the
unique-answer ratio and the correction rate at turn 2, the wall-clock per stage, where each method's
training weight went (by the turn of the first correct answer), and the checks of the evidence issue
computed from these numbers; writes a JSON line and a plot of multi@k per method.

    .venv/bin/python benchmarks/quality.py [--config jobs/demo_cpu.yaml] [--seeds 0 1 2] [--betas 0.5 1.0]
        [--rounds 2] [--quick] [--out DIR] [key.path=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import (  # noqa: E402
    QUICK_PIPELINE_OVERRIDES,
    append_result,
    argument_parser,
    print_table,
    reused_work,
    run_benchmark,
    weight_checksums,
    whole_number,
)

from drift_ray.config import WeightMode, load_config  # noqa: E402
from drift_ray.demo_model import save_untrained_demo_model  # noqa: E402
from drift_ray.evaluation import plot_cumulative_accuracy  # noqa: E402
from drift_ray.pipeline import resolve_model, run_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "reference"
DRIFT = WeightMode.drift.value
SFT = WeightMode.uniform.value
METRICS = ["multi@1", "multi@3", "multi@5", "unique_answer_ratio_all", "correction@2"]
STAGES = ["rollouts", "weights", "weighted_sft"]
WEIGHT_SHARES = ["turn1", "turn2", "turn3+", "unsolved"]


@dataclass(frozen=True)
class Method:
    """One training run per seed: its row label, weighting mode, extra config overrides and rounds."""

    label: str
    mode: str
    overrides: tuple[str, ...] = ()
    rounds: int = 1

    def round_labels(self) -> list[str]:
        return [self.label if r == 1 else f"{self.label}_round{r}" for r in range(1, self.rounds + 1)]


def beta_name(beta: float) -> str:
    return f"{beta:g}"


def comparison_methods(modes: list[str], betas: list[float], rounds: int) -> list[Method]:
    methods = []
    for mode in modes:
        methods.append(Method(mode, mode, rounds=rounds))
        if mode == DRIFT:
            methods += [Method(f"{DRIFT}_beta{beta_name(beta)}", DRIFT, (f"weights.beta={beta}",)) for beta in betas]
    return methods


def run_method(
    config: Path, overrides: list[str], seed: int, method: Method, work: Path, reference: str, samples_rollouts: bool
) -> dict[str, dict[str, Any]]:
    """One seed × method through the whole pipeline; metrics, per-stage wall-clock and weight shares of
    every model it evaluated, by row label (the reference included). `samples_rollouts`: whether this is
    the seed's first method, which samples the reference's rollouts that the others reuse."""
    run_dir = work / f"seed{seed}" / method.label
    cfg = load_config(
        config,
        [
            *overrides,
            *method.overrides,
            f"seed={seed}",
            f"weights.mode={method.mode}",
            f"rounds={method.rounds}",
            f"rollout.model={reference}",
            f"run_dir={run_dir}",
            f"rollout.output_dir={work / f'seed{seed}' / 'rollouts'}",
        ],
    )
    result = run_pipeline(cfg)
    models = {REFERENCE: {"metrics": result["metrics"][REFERENCE]}}
    for r, label in enumerate(method.round_labels(), start=1):
        suffix = "" if r == 1 else f"_round{r}"
        timings = {stage: result["timings_s"][stage + suffix] for stage in STAGES}
        models[label] = {
            "metrics": result["metrics"][method.mode + suffix],
            "timings_s": timings,
            # A --work-dir that holds this run already, in whole or part: its stages took seconds, not their cost.
            "reused": reused_work(result["work_by_round"][r - 1], samples_rollouts=r > 1 or samples_rollouts),
            "weight_share": result["weights_by_round"][r - 1]["weight_share_by_first_correct_turn"],
        }
    return models


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Over the seeds where the metric is defined (None, e.g. a ratio of no answers, is left out); None
    when it is defined in none (JSON has no NaN), and the sample std None when in one."""
    defined = [v for v in values if v is not None]
    if not defined:
        return None, None
    return float(np.mean(defined)), float(np.std(defined, ddof=1)) if len(defined) > 1 else None


def grouped_weight_share(share: dict[str, float]) -> dict[str, float]:
    """The diagnostics' share of weight per first-correct turn, folded into WEIGHT_SHARES."""
    return {
        "turn1": share.get("1", 0.0),
        "turn2": share.get("2", 0.0),
        "turn3+": sum(v for k, v in share.items() if k.isdigit() and int(k) >= 3),
        "unsolved": share.get("unsolved", 0.0),
    }


def summary_rows(runs: dict[tuple[int, str], dict[str, Any]], seeds: list[int], labels: list[str]) -> list[dict[str, Any]]:
    rows = []
    for label in [REFERENCE, *labels]:
        per_seed = [runs[(seed, label)] for seed in seeds]
        row: dict[str, Any] = {"method": label, "seeds": len(per_seed)}
        for key in METRICS:
            values = [
                run["metrics"]["correction_rate"].get("2") if key == "correction@2" else run["metrics"][key]
                for run in per_seed
            ]
            mean, std = mean_std(values)
            defined = sum(v is not None for v in values)
            text = "–" if mean is None else f"{mean:.3f}" + ("" if std is None else f" ± {std:.3f}")
            row[key] = text + (f" ({defined} seeds)" if defined < len(values) else "")
            row[f"{key}_mean"], row[f"{key}_std"] = mean, std
            row[f"{key}_per_seed"] = values  # in `seeds` order, for comparisons paired by seed
        if label != REFERENCE:
            reused = [seed for seed, run in zip(seeds, per_seed) if run["reused"]]
            for stage in STAGES:
                mean_s = float(np.mean([run["timings_s"][stage] for run in per_seed]))
                row[f"{stage}_s"] = None if reused else round(mean_s, 1)
            if reused:
                row["reused_in_seeds"] = reused
            for part in WEIGHT_SHARES:
                row[f"weight_{part}"] = round(float(np.mean([grouped_weight_share(run["weight_share"])[part] for run in per_seed])), 3)
        rows.append(row)
    return rows


def evidence_checks(rows: list[dict[str, Any]]) -> list[str]:
    """The evidence issue's criteria, computed from the measured means and stds: every method's gain of
    multi@5 over acc@1 (what the feedback adds), and DRIFT's multi@5 against SFT of the same round; the
    criterion is about DRIFT at the config's β, the other DRIFT rows are compared the same way.

    Methods of one seed share the seed's prompts and test set, and in round 1 the reference's rollouts too
    (a later round collects its own, from its own round-1 model), so the DRIFT − SFT gap is also given
    paired by seed (mean ± std of the per-seed differences, and in how many seeds DRIFT leads):
    seed-to-seed variation both methods share cancels there."""
    row_of = {row["method"]: row for row in rows}
    base = row_of[REFERENCE]
    checks = [f"reference greedy multi@5 − acc@1 = {base['multi@5_mean'] - base['multi@1_mean']:+.3f}"]
    for label, row in row_of.items():
        if label == REFERENCE:
            continue
        checks.append(f"{label} multi@5 − acc@1 = {row['multi@5_mean'] - row['multi@1_mean']:+.3f}")
        if not label.startswith(DRIFT):
            continue
        sft_label = SFT + (label[label.index("_round"):] if "_round" in label else "")
        if sft_label in row_of:
            sft = row_of[sft_label]
            gap = row["multi@5_mean"] - sft["multi@5_mean"]
            stds = (row["multi@5_std"], sft["multi@5_std"])
            if None in stds:
                checks.append(f"{label} multi@5 − {sft_label} multi@5 = {gap:+.3f}; seed noise unknown: a std needs 2 seeds")
            else:
                noise = 2 * max(stds)
                verdict = "NOT beyond" if abs(gap) <= noise else f"{label} {'ahead' if gap > 0 else 'behind'} beyond"
                checks.append(f"{label} multi@5 − {sft_label} multi@5 = {gap:+.3f}; 2 × the larger seed std = {noise:.3f}: "
                              f"{verdict} seed noise")
            checks.append(paired_check(label, row["multi@5_per_seed"], sft_label, sft["multi@5_per_seed"]))
    return checks


def paired_check(label: str, values: list[float], other_label: str, other_values: list[float]) -> str:
    differences = [a - b for a, b in zip(values, other_values, strict=True)]
    mean, std = mean_std(differences)
    leads = sum(d > 0 for d in differences)
    spread = "" if std is None else f" ± {std:.3f}"
    return (f"{label} − {other_label} multi@5 paired by seed = {mean:+.3f}{spread} "
            f"({' '.join(f'{d:+.3f}' for d in differences)}); {label} ahead in {leads} of {len(differences)} seeds")


def parse_arguments(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, checked before anything runs: the config would refuse a negative seed or 0 rounds
    only once the demo reference is built (minutes), and nothing later refuses a value given twice."""
    parser = argument_parser(__doc__, "quality")
    parser.add_argument("--config", type=Path, default=ROOT / "jobs" / "demo_cpu.yaml",
                        help="the config of every run (default: jobs/demo_cpu.yaml)")
    parser.add_argument("--seeds", type=whole_number(0, "is negative; a seed is 0 or more"), nargs="+", default=[0, 1, 2],
                        help="one run of every method per seed, each sampling its own rollouts (default: 0 1 2; the "
                        "first alone with --quick)")
    parser.add_argument("--modes", nargs="+", default=[m.value for m in WeightMode], choices=[m.value for m in WeightMode],
                        help="the weights.mode of each method (default: all)")
    parser.add_argument("--betas", type=float, nargs="*", default=[0.5, 1.0], help="DRIFT also at these β (beside the config's)")
    parser.add_argument("--rounds", type=whole_number(1, "rounds; a run has 1 or more"), default=2,
                        help="rounds of every mode at the config's β (iterated DRIFT, SFT, RFT)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the runs here (default: a temporary dir)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides for every run")
    args = parser.parse_args(argv)
    # A seed given twice runs in the same seed{s}/ directories, reuses the first run's work and counts as
    # a second seed of equal multi@5: the std shrinks and a gap within noise reads as beyond it. A β or a
    # mode given twice makes two rows of one name, which the checks and the JSON line cannot tell apart.
    for flag, names, why in [
        ("--seeds", [str(s) for s in args.seeds], "each seed is one sample of the spread"),
        ("--betas", [beta_name(b) for b in args.betas], "each β is one row, named by its value"),
        ("--modes", args.modes, "each mode is one row"),
    ]:
        repeated = list(dict.fromkeys(name for name in names if names.count(name) > 1))
        if repeated:
            parser.error(f"argument {flag}: {', '.join(repeated)} given more than once; {why}")
    return parser, args


def main() -> None:
    parser, args = parse_arguments()
    logging.basicConfig(level=logging.WARNING)
    overrides = [*(QUICK_PIPELINE_OVERRIDES if args.quick else []), *args.overrides]
    seeds = args.seeds[:1] if args.quick else args.seeds
    # An untrained model never answers correctly (success_only would have nothing to train on), and the
    # smoke test checks the plumbing: one seed of DRIFT, with its rounds, is enough.
    methods = comparison_methods([DRIFT] if args.quick else args.modes, [] if args.quick else args.betas, args.rounds)
    labels = [label for method in methods for label in method.round_labels()]
    base = load_config(args.config, overrides)
    if base.episode.max_turns < 5:
        parser.error(f"episode.max_turns is {base.episode.max_turns}: the comparison reports multi@3 and multi@5")
    if DRIFT in args.modes and not args.quick and beta_name(base.weights.beta) in map(beta_name, args.betas):
        parser.error(f"argument --betas: {beta_name(base.weights.beta)} is the config's weights.beta, which the drift "
                     "method runs already")
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="drift-quality-") as tmp:
        work = args.work_dir or Path(tmp)
        if args.quick:  # plumbing only: an untrained model instead of building the demo reference
            reference = save_untrained_demo_model(work / "untrained-reference")
        else:
            reference = resolve_model(base.rollout.model, base)  # one reference for every seed and method
        reference_sha256 = weight_checksums(reference)  # while a --quick reference still exists
        runs: dict[tuple[int, str], dict[str, Any]] = {}
        for seed in seeds:
            for i, method in enumerate(methods):
                for label, run in run_method(args.config, overrides, seed, method, work, reference, i == 0).items():
                    if label != REFERENCE or i == 0:  # the reference's row: from the seed's first run
                        runs[(seed, label)] = run
        rows = summary_rows(runs, seeds, labels)
        print_table(rows, ["method", "seeds", *METRICS, *(f"{stage}_s" for stage in STAGES)])
        print("(rollouts_s: the first method of a seed samples the reference's rollouts, the others reuse them; "
              "a later round samples its own)")
        for row in rows:
            if "reused_in_seeds" in row:
                print(f"({row['method']}: no stage times, its runs of seeds {row['reused_in_seeds']} took over work "
                      "that a run in --work-dir had done)")
        print("\nshare of the training weight by the turn of the trajectory's first correct answer (mean over seeds):")
        print_table([row for row in rows if row["method"] != REFERENCE], ["method", *(f"weight_{p}" for p in WEIGHT_SHARES)])
        # --quick leaves no plot behind: its results directory holds the JSON line alone.
        plot = (work if args.quick else args.out) / "quality.png"
        max_turns = base.episode.max_turns
        curves = {
            row["method"]: {
                f"multi@{k}": float(np.mean([runs[(seed, row["method"])]["metrics"][f"multi@{k}"] for seed in seeds]))
                for k in range(1, max_turns + 1)
            }
            for row in rows
        }
        plot_cumulative_accuracy(curves, max_turns, plot, title=f"multi@k, mean of {len(seeds)} seed(s)")
        if args.work_dir or not args.quick:  # else it goes with the temporary directory
            print(f"plot: {plot}")
    checks = evidence_checks(rows)
    print("\n".join(checks))
    appended = append_result(
        "quality",
        {
            "config": str(args.config),
            "overrides": overrides,
            "resolved_config": base.model_dump(mode="json"),
            "seeds": seeds,
            "methods": [vars(method) for method in methods],
            "quick": args.quick,
            "reference": reference,
            "reference_sha256": reference_sha256,
        },
        [{k: v for k, v in row.items() if not (isinstance(v, str) and k != "method")} for row in rows],
        args.out,
    )
    print(f"appended to {appended}")


if __name__ == "__main__":
    run_benchmark(main)
