"""Evaluation of multi-turn correction: metrics of greedy episodes, a comparison table and a plot.

Pure: plain Python on trajectory rows (one greedy episode per problem, as `Episode.to_row` writes them).
With N problems and T = max_turns, where an episode stops at its first correct turn t* or after T turns:

- multi@k: share of problems with t* ≤ k (acc@1 = multi@1; the headline is multi@T).
- per-turn accuracy at t: problems solved at turn t / problems that played turn t. An episode plays
  turn t only while unsolved, so the denominator is "still unsolved when turn t started".
- correction rate: the per-turn accuracy at t ≥ 2, per turn and pooled over t ≥ 2.
- unique-answer ratio: distinct normalised answers / parsable answers of one problem, averaged over
  problems with at least one parsable answer, and over those of them never solved.
- average turns played, format-failure rate (turns without a parsable answer / all turns), mean
  generated tokens per problem, and the cut-off rate (replies that reached max_new_tokens before they
  ended / the turns whose CUT_OFF is known; None where none is).
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from drift_ray import schema
from drift_ray.trajectories import write_atomic

EVALUATION_INPUT = (
    schema.PROMPT_ID,
    schema.CORRECT,
    schema.ANSWER_NORMS,
    schema.FORMAT_FAILURES,
    schema.T_STAR,
    schema.NUM_TURNS,
    schema.COMPLETION_TOKENS,
)

_MARKERS = "osD^vP*X"


@dataclass(frozen=True)
class _Outcome:
    """One problem's greedy episode, checked for consistency."""

    t_star: int | None
    num_turns: int
    format_failures: int
    answer_norms: list[str]
    completion_tokens: int
    cut_off: list[bool]  # of the turns whose flag is known


def _read_outcomes(rows: pa.Table | Sequence[Mapping[str, Any]], max_turns: int) -> list[_Outcome]:
    """Check every row against the episode's rules and keep what the metrics need."""
    if isinstance(rows, pa.Table):
        schema.require_columns(rows.column_names, EVALUATION_INPUT, stage="evaluation", source="trajectory table")
        optional = [schema.CUT_OFF] if schema.CUT_OFF in rows.column_names else []
        rows = rows.select([*EVALUATION_INPUT, *optional]).to_pylist()
    if not rows:
        raise ValueError("evaluation: no trajectory rows were given; expected one greedy episode per problem")
    outcomes = []
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        schema.require_columns(row.keys(), EVALUATION_INPUT, stage="evaluation", source=f"row {index}")
        prompt_id = row[schema.PROMPT_ID]
        where = f"evaluation row {index} (prompt_id {prompt_id!r})"
        if prompt_id in seen:
            raise ValueError(
                f"{where}: prompt_id already used by row {seen[prompt_id]}; expected one greedy episode per problem"
            )
        seen[prompt_id] = index
        outcomes.append(_read_outcome(row, max_turns, where))
    return outcomes


def _as_list(value: Any) -> list[Any] | None:
    """A per-turn column's value as a list (from a list, a tuple or pandas' array); None if it is none."""
    return None if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable) else list(value)


def _turns(row: Mapping[str, Any], column: str, where: str) -> list[Any]:
    values = _as_list(row[column])
    if values is None or any(v is None for v in values):
        raise ValueError(f"{where}: {column} is {schema.short_repr(row[column])}; expected a list without nulls")
    return values


def _read_outcome(row: Mapping[str, Any], max_turns: int, where: str) -> _Outcome:
    correct, format_failures, answer_norms = (
        _turns(row, column, where) for column in (schema.CORRECT, schema.FORMAT_FAILURES, schema.ANSWER_NORMS)
    )
    if isinstance(row[schema.COMPLETION_TOKENS], bool) or not isinstance(row[schema.COMPLETION_TOKENS], numbers.Integral):
        found = schema.short_repr(row[schema.COMPLETION_TOKENS])
        raise ValueError(f"{where}: {schema.COMPLETION_TOKENS} is {found}; expected a whole number")
    num_turns = len(correct)
    first_correct = correct.index(True) + 1 if True in correct else None
    problems = []
    if not 1 <= num_turns <= max_turns:
        problems.append(f"{schema.CORRECT} has {num_turns} turns; expected 1 to max_turns={max_turns}")
    if row[schema.NUM_TURNS] != num_turns:
        problems.append(f"{schema.NUM_TURNS} is {row[schema.NUM_TURNS]} but {schema.CORRECT} has {num_turns} turns")
    if len(format_failures) != num_turns:
        problems.append(f"{schema.FORMAT_FAILURES} has {len(format_failures)} turns; expected {num_turns}")
    t_star = row[schema.T_STAR]
    if isinstance(t_star, float) and math.isnan(t_star):  # pandas' null in a column of integers
        t_star = None
    if t_star != first_correct:
        problems.append(
            f"{schema.T_STAR} is {t_star} but the first correct turn in {schema.CORRECT} is {first_correct}"
        )
    if first_correct is not None and first_correct != num_turns:
        problems.append(f"the episode went on after its first correct turn {first_correct} to {num_turns} turns")
    if first_correct is None and num_turns < max_turns:
        problems.append(
            f"never correct yet stopped after {num_turns} turns; an unsolved episode plays max_turns={max_turns} "
            f"turns (evaluate with the max_turns the episodes were played with)"
        )
    given_cut_off = row.get(schema.CUT_OFF)
    cut_off = _as_list(given_cut_off)
    if given_cut_off is not None and (cut_off is None or len(cut_off) != num_turns):
        found = f"is {schema.short_repr(given_cut_off)}" if cut_off is None else f"has {len(cut_off)} turns"
        problems.append(f"{schema.CUT_OFF} {found}; expected a flag for each of the {num_turns} turns")
    if any(right and failed for right, failed in zip(correct, format_failures)):
        problems.append("a turn is both correct and a format failure; a turn without an answer is wrong")
    parsable = num_turns - sum(format_failures)
    if len(answer_norms) != parsable:
        problems.append(f"{schema.ANSWER_NORMS} has {len(answer_norms)} answers; expected {parsable} parsable turns")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    return _Outcome(
        t_star=first_correct,
        num_turns=num_turns,
        format_failures=sum(format_failures),
        answer_norms=answer_norms,
        completion_tokens=int(row[schema.COMPLETION_TOKENS]),
        cut_off=[flag for flag in cut_off or () if flag is not None],
    )


def _mean_or_none(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _unique_ratio(outcome: _Outcome) -> float:
    return len(set(outcome.answer_norms)) / len(outcome.answer_norms)


def episode_metrics(rows: pa.Table | Sequence[Mapping[str, Any]], max_turns: int) -> dict[str, Any]:
    """Metrics of one model's greedy episodes (one row per problem), JSON-serialisable.

    Keys: "num_problems", "max_turns", "multi@1".."multi@T", "per_turn_accuracy" and "correction_rate"
    (turn number as a string → value, None where no episode played that turn), "correction_rate_t>=2",
    "unique_answer_ratio_all", "unique_answer_ratio_unsolved", "avg_turns", "format_failure_rate",
    "mean_completion_tokens", "cut_off_rate". Fractions lie in [0, 1].

    "correction_rate_t>=2" pools turns 2..T: (problems solved at a turn ≥ 2) / (Σ_{t≥2} problems that
    played turn t), i.e. the share of all second-and-later attempts that fixed a wrong answer; None when
    no episode played a second turn. The unique-answer ratios skip problems without a parsable answer
    (the ratio is undefined there); "_unsolved" averages over problems never solved; None when empty.

    Raises ValueError naming the row when a row breaks the episode's rules (more than max_turns turns,
    t_star not the first correct turn, turns after the first correct one, …) or a prompt_id repeats.
    """
    if max_turns < 1:
        raise ValueError(f"evaluation: max_turns is {max_turns}; expected a positive number of turns")
    outcomes = _read_outcomes(rows, max_turns)
    num_problems = len(outcomes)
    solved_at = Counter(o.t_star for o in outcomes if o.t_star is not None)
    turns = range(1, max_turns + 1)
    played = {t: sum(o.num_turns >= t for o in outcomes) for t in turns}
    per_turn = {str(t): solved_at[t] / played[t] if played[t] else None for t in turns}
    later_attempts = sum(played[t] for t in turns if t >= 2)
    later_solved = sum(solved_at[t] for t in turns if t >= 2)
    parsable = [o for o in outcomes if o.answer_norms]
    total_turns = sum(o.num_turns for o in outcomes)
    cut_off = [flag for o in outcomes for flag in o.cut_off]
    metrics: dict[str, Any] = {"num_problems": num_problems, "max_turns": max_turns}
    solved_so_far = 0
    for t in turns:
        solved_so_far += solved_at[t]
        metrics[f"multi@{t}"] = solved_so_far / num_problems
    metrics.update(
        {
            "per_turn_accuracy": per_turn,
            "correction_rate": {t: rate for t, rate in per_turn.items() if t != "1"},
            "correction_rate_t>=2": later_solved / later_attempts if later_attempts else None,
            "unique_answer_ratio_all": _mean_or_none([_unique_ratio(o) for o in parsable]),
            "unique_answer_ratio_unsolved": _mean_or_none([_unique_ratio(o) for o in parsable if o.t_star is None]),
            "avg_turns": total_turns / num_problems,
            "format_failure_rate": sum(o.format_failures for o in outcomes) / total_turns,
            "mean_completion_tokens": sum(o.completion_tokens for o in outcomes) / num_problems,
            "cut_off_rate": _mean_or_none(cut_off),
        }
    )
    return metrics


def _metric(metrics: Mapping[str, Any], model: str, key: str) -> Any:
    if key not in metrics:
        raise ValueError(
            f"evaluation: metrics of model {model!r} have no {key!r}; found {sorted(metrics)}. "
            f"Compute them with episode_metrics(rows, max_turns) using the same max_turns."
        )
    return metrics[key]


def _require_models(metrics_by_model: Mapping[str, Mapping[str, Any]], max_turns: int, purpose: str) -> None:
    if not metrics_by_model:
        raise ValueError(f"evaluation: no models to {purpose}; expected a mapping model name → episode_metrics(...)")
    for model, metrics in metrics_by_model.items():
        if metrics.get("max_turns", max_turns) != max_turns:  # a model's multi@k would sit under another T
            raise ValueError(
                f"evaluation: model {model!r} was evaluated over {metrics['max_turns']} turns, not the {max_turns} "
                f"asked for; {purpose} models evaluated with the same episode.max_turns"
            )


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def comparison_table(metrics_by_model: Mapping[str, Mapping[str, Any]], max_turns: int) -> str:
    """A markdown table, one row per model; fractions and averages with 3 decimals, "–" where undefined."""
    _require_models(metrics_by_model, max_turns, "compare")
    multi_keys = [f"multi@{k}" for k in range(1, max_turns + 1)]
    summary_keys = ["correction_rate_t>=2", "unique_answer_ratio_all", "unique_answer_ratio_unsolved"]
    summary_keys += ["avg_turns", "format_failure_rate", "num_problems"]
    header = ["model", *multi_keys, "correction rate t≥2", "unique-answer ratio (all / unsolved)"]
    header += ["avg turns", "format-failure rate", "problems"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, metrics in metrics_by_model.items():
        value = {key: _metric(metrics, model, key) for key in multi_keys + summary_keys}
        cells = [model.replace("|", "\\|"), *(_number(value[key]) for key in multi_keys)]
        cells.append(_number(value["correction_rate_t>=2"]))
        cells.append(f"{_number(value['unique_answer_ratio_all'])} / {_number(value['unique_answer_ratio_unsolved'])}")
        cells += [_number(value["avg_turns"]), _number(value["format_failure_rate"]), str(value["num_problems"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_cumulative_accuracy(
    metrics_by_model: Mapping[str, Mapping[str, Any]],
    max_turns: int,
    path: str | os.PathLike[str],
    title: str | None = None,
) -> str:
    """A PNG of multi@k against the turn k, one line per model; returns the path written."""
    # The Agg canvas directly, not pyplot: no global backend switch, safe inside any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _require_models(metrics_by_model, max_turns, "plot")
    turns = list(range(1, max_turns + 1))
    figure = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    lines = []
    for (model, metrics), marker in zip(metrics_by_model.items(), itertools.cycle(_MARKERS)):
        accuracy = [_metric(metrics, model, f"multi@{k}") for k in turns]
        lines += axes.plot(turns, accuracy, marker=marker, clip_on=False)
    axes.set_xticks(turns)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("turn k")
    axes.set_ylabel("multi@k (share solved by turn k)")
    axes.set_title(title or "Cumulative accuracy over correction turns")
    axes.grid(alpha=0.3)
    # The names are set on the legend's texts: matplotlib leaves out a line whose label starts with "_"
    # (older versions even when the labels are given), and a model may be called "_final".
    legend = axes.legend(lines, [f"model {i}" for i in range(len(lines))], loc="best")
    for text, model in zip(legend.get_texts(), metrics_by_model):
        text.set_text(model)
    figure.tight_layout()
    return write_atomic(path, lambda handle: figure.savefig(handle, format="png"))


# Below the table in eval.md, which a reader may open without the README at hand.
COLUMNS_EXPLAINED = """\
- **multi@k**: the share of the problems answered correctly within the first k turns (multi@1 is acc@1).
- **correction rate t≥2**: of the turns 2..T played (each by a problem unsolved until then), the share answered
  correctly; per turn, with turn 1, as `per_turn_accuracy` in eval.json.
- **unique-answer ratio (all / unsolved)**: distinct normalised answers over parsable answers in an episode,
  averaged over the problems with a parsable answer / over those never solved; low: a wrong answer repeated.
- **avg turns**: the turns played per problem; an episode stops at its first correct answer.
- **format-failure rate**: the turns without a parsable `<answer>` over all turns played.
- **problems**: the test problems evaluated, one greedy episode each.

"–": undefined (no problem to average over). eval.json also holds the share of replies cut off at
eval.max_new_tokens (`cut_off_rate`), each of them a format failure.
"""


def write_report(
    metrics_by_model: Mapping[str, Mapping[str, Any]],
    max_turns: int,
    out_dir: str | os.PathLike[str],
    evaluated_on: str = "",
) -> dict[str, str]:
    """Write eval.json (metrics per model), eval.md (`evaluated_on`, what the models were scored on, above the
    table, its columns explained below it) and eval.png (the plot) into out_dir.

    Returns their paths under the keys "json", "markdown" and "plot". An earlier report's files go first and
    eval.json, the record, comes last: a report cut short never stands beside files of another one.
    """
    out_dir = Path(out_dir)
    text = json.dumps(metrics_by_model, indent=2, allow_nan=False) + "\n"
    table = comparison_table(metrics_by_model, max_turns)
    for name in ("eval.json", "eval.md", "eval.png"):
        (out_dir / name).unlink(missing_ok=True)
    plot = plot_cumulative_accuracy(metrics_by_model, max_turns, out_dir / "eval.png")
    heading = f"{evaluated_on}\n\n" if evaluated_on else ""  # a table shared on its own would not say which task
    markdown = write_atomic(out_dir / "eval.md", lambda handle: handle.write(f"{heading}{table}\n{COLUMNS_EXPLAINED}".encode()))
    record = write_atomic(out_dir / "eval.json", lambda handle: handle.write(text.encode()))
    return {"json": record, "markdown": markdown, "plot": plot}
