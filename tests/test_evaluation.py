"""Tests of drift_ray/evaluation.py: metrics of hand-made episodes, their invariants, the table, the plot."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_ray import evaluation, schema
from drift_ray.config import EpisodeConfig
from drift_ray.episode import Episode, Generation, first_messages
from drift_ray.evaluation import COLUMNS_EXPLAINED, comparison_table, episode_metrics, plot_cumulative_accuracy, write_report
from drift_ray.prompts import Problem
from drift_ray.verifiers import ExactVerifier

GOLD = "42"
TOKENS_PER_REPLY = 10
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def play(prompt_id: str, replies: list[str], max_turns: int) -> dict:
    """The row of a real episode fed the scripted replies, until it ends; one that ends in "..." reached
    max_new_tokens."""
    cfg = EpisodeConfig(max_turns=max_turns)
    episode = Episode(Problem(prompt_id, "question", GOLD), 0, first_messages("question", cfg))
    for reply in replies:
        if episode.done:
            break
        generation = Generation(reply, 5, TOKENS_PER_REPLY, cut_off=reply.endswith("..."))
        episode.take_turn(generation, ExactVerifier(), cfg)
    return episode.to_row(cfg, model="scripted")


def hand_made_rows() -> list[dict]:
    """Max 3 turns: solved at turn 1; solved at turn 3; never solved, repeating; never solved, one format failure."""
    return [
        play("first", ["<answer>42</answer>"], 3),
        play("third", ["<answer>1</answer>", "<answer>2</answer>", "<answer> 42 </answer>"], 3),
        play("repeats", ["<answer>5</answer>", "<answer>5</answer>", "<answer>6</answer>"], 3),
        play("format", ["<answer>7</answer>", "no answer tag, as it ran out of tok...", "<answer>7</answer>"], 3),
    ]


def test_metrics_of_hand_made_episodes() -> None:
    metrics = episode_metrics(hand_made_rows(), max_turns=3)

    assert metrics["num_problems"] == 4
    # Solved: one at turn 1, none at turn 2, one at turn 3.
    assert metrics["multi@1"] == pytest.approx(1 / 4)
    assert metrics["multi@2"] == pytest.approx(1 / 4)
    assert metrics["multi@3"] == pytest.approx(2 / 4)
    # Turn 1: 4 played, 1 solved; turns 2 and 3: 3 played each (all but "first"), 0 then 1 solved.
    assert metrics["per_turn_accuracy"] == pytest.approx({"1": 1 / 4, "2": 0.0, "3": 1 / 3})
    assert metrics["correction_rate"] == pytest.approx({"2": 0.0, "3": 1 / 3})
    assert metrics["correction_rate_t>=2"] == pytest.approx(1 / 6)
    # Distinct/parsable: first 1/1, third 3/3, repeats 2/3 ({5, 6}), format 1/2 ({7}, the tagless turn skipped).
    assert metrics["unique_answer_ratio_all"] == pytest.approx((1 + 1 + 2 / 3 + 1 / 2) / 4)
    assert metrics["unique_answer_ratio_unsolved"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # Turns 1 + 3 + 3 + 3 = 10, one of them without an answer.
    assert metrics["avg_turns"] == pytest.approx(10 / 4)
    assert metrics["format_failure_rate"] == pytest.approx(1 / 10)
    assert metrics["mean_completion_tokens"] == pytest.approx(10 * TOKENS_PER_REPLY / 4)
    assert metrics["cut_off_rate"] == pytest.approx(1 / 10)
    assert json.loads(json.dumps(metrics)) == metrics


def test_arrow_table_gives_the_same_metrics_as_rows() -> None:
    rows = hand_made_rows()
    assert episode_metrics(pa.Table.from_pylist(rows), max_turns=3) == episode_metrics(rows, max_turns=3)


def test_undefined_metrics_are_none() -> None:
    # Everyone solves at turn 1: no turn 2 is played and no problem stays unsolved.
    rows = [play(f"p{i}", ["<answer>42</answer>"], 3) for i in range(2)]
    metrics = episode_metrics(rows, max_turns=3)
    assert metrics["multi@1"] == metrics["multi@3"] == 1.0
    assert metrics["per_turn_accuracy"] == {"1": 1.0, "2": None, "3": None}
    assert metrics["correction_rate_t>=2"] is None
    assert metrics["unique_answer_ratio_unsolved"] is None
    # Only format failures: no parsable answer anywhere.
    silent = episode_metrics([play("silent", ["nothing", "nothing"], 2)], max_turns=2)
    assert silent["unique_answer_ratio_all"] is None
    assert silent["format_failure_rate"] == 1.0
    # Episodes that did not record which replies were cut off (older rollouts).
    unknown = [{**row, schema.CUT_OFF: None} for row in hand_made_rows()]
    assert episode_metrics(unknown, max_turns=3)["cut_off_rate"] is None
    assert episode_metrics(pa.Table.from_pylist(unknown).drop_columns([schema.CUT_OFF]), 3)["cut_off_rate"] is None


REPLIES = st.sampled_from(["<answer>42</answer>", "<answer>1</answer>", "<answer>2</answer>", "no tag"])


@st.composite
def episode_rows(draw: st.DrawFn) -> tuple[list[dict], int]:
    max_turns = draw(st.integers(1, 6))
    scripts = draw(st.lists(st.lists(REPLIES, min_size=max_turns, max_size=max_turns), min_size=1, max_size=12))
    return [play(f"p{i}", script, max_turns) for i, script in enumerate(scripts)], max_turns


@settings(max_examples=60, deadline=None)
@given(episode_rows())
def test_multi_at_k_is_monotone_and_follows_per_turn_accuracy(drawn: tuple[list[dict], int]) -> None:
    rows, max_turns = drawn
    metrics = episode_metrics(rows, max_turns)
    multi = [0.0] + [metrics[f"multi@{k}"] for k in range(1, max_turns + 1)]
    assert all(0.0 <= a <= b <= 1.0 for a, b in zip(multi, multi[1:]))
    assert multi[-1] == pytest.approx(sum(r[schema.T_STAR] is not None for r in rows) / len(rows))
    for k in range(1, max_turns + 1):
        # Solved by k = solved by k-1 + accuracy at k × share still unsolved after k-1.
        accuracy = metrics["per_turn_accuracy"][str(k)] or 0.0
        assert multi[k] == pytest.approx(multi[k - 1] + accuracy * (1.0 - multi[k - 1]))


def table_cells(table: str) -> dict[str, list[str]]:
    lines = table.strip().splitlines()
    header, rows = lines[0], lines[2:]
    width = header.count("|")
    assert all(row.count("|") == width for row in rows)
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in row.strip("|").split("|")] for row in rows)}


def two_models() -> dict[str, dict]:
    better = [play(f"p{i}", ["<answer>42</answer>"], 3) for i in range(3)] + [hand_made_rows()[1]]
    return {"base": episode_metrics(hand_made_rows(), 3), "drift": episode_metrics(better, 3)}


def test_comparison_table_has_every_model_and_its_numbers() -> None:
    metrics_by_model = two_models()
    cells = table_cells(comparison_table(metrics_by_model, max_turns=3))
    assert set(cells) == {"base", "drift"}
    assert cells["base"] == ["0.250", "0.250", "0.500", "0.167", "0.792 / 0.583", "2.500", "0.100", "4"]
    drift = metrics_by_model["drift"]
    expected_multi = [f"{drift[f'multi@{k}']:.3f}" for k in (1, 2, 3)]
    assert cells["drift"][:3] == expected_multi == ["0.750", "0.750", "1.000"]
    assert cells["drift"][4] == "1.000 / –"  # every answer distinct; nothing left unsolved


def test_comparison_table_names_the_model_with_missing_metrics() -> None:
    metrics = {key: value for key, value in episode_metrics(hand_made_rows(), 3).items() if key != "multi@2"}
    with pytest.raises(ValueError, match=r"model 'base' have no 'multi@2'"):
        comparison_table({"base": metrics}, max_turns=3)


@pytest.mark.parametrize("max_turns", [2, 5])
def test_models_evaluated_over_other_turns_are_refused(tmp_path, max_turns) -> None:
    with pytest.raises(ValueError, match=rf"model 'base' was evaluated over 3 turns, not the {max_turns} asked for"):
        comparison_table(two_models(), max_turns=max_turns)
    with pytest.raises(ValueError, match="was evaluated over 3 turns"):
        plot_cumulative_accuracy(two_models(), max_turns, tmp_path / "multi.png")


def test_plot_is_a_png_written_atomically(tmp_path) -> None:
    path = plot_cumulative_accuracy(two_models(), 3, tmp_path / "plots" / "multi.png", title="test")
    with open(path, "rb") as handle:
        assert handle.read(len(PNG_MAGIC)) == PNG_MAGIC
    assert (tmp_path / "plots" / "multi.png").stat().st_size > 0
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["multi.png"]  # no temporary file left


def test_the_plot_legend_names_every_model_even_one_named_with_a_leading_underscore(tmp_path, monkeypatch) -> None:
    from matplotlib.figure import Figure

    plotted = []
    save = Figure.savefig

    def keep_and_save(figure, *args, **kwargs):
        plotted.append(figure)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep_and_save)
    metrics = two_models()
    models = dict(zip(["_final", *list(metrics)[1:]], metrics.values()))
    plot_cumulative_accuracy(models, 3, tmp_path / "multi.png")
    [figure] = plotted
    legend = figure.axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == list(models)
    assert len(legend.legend_handles) == len(figure.axes[0].get_lines()) == len(models)


def test_write_report_writes_json_markdown_and_png(tmp_path) -> None:
    metrics_by_model = two_models()
    paths = write_report(metrics_by_model, 3, tmp_path, "Task 't': 2 test problems.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.md", "eval.png"]
    with open(paths["json"]) as handle:
        assert json.load(handle) == metrics_by_model
    with open(paths["markdown"]) as handle:
        assert handle.read() == f"Task 't': 2 test problems.\n\n{comparison_table(metrics_by_model, 3)}\n{COLUMNS_EXPLAINED}"
    # Every column of the table is explained below it.
    header = comparison_table(metrics_by_model, 3).splitlines()[0].strip("| ").split(" | ")
    explained = re.findall(r"^- \*\*(.+?)\*\*", COLUMNS_EXPLAINED, flags=re.M)
    assert list(dict.fromkeys(re.sub(r"@\d", "@k", name) for name in header[1:])) == explained
    with open(paths["plot"], "rb") as handle:
        assert handle.read(len(PNG_MAGIC)) == PNG_MAGIC


def test_a_report_cut_short_leaves_no_file_of_the_one_before(tmp_path, monkeypatch) -> None:
    write_report(two_models(), 3, tmp_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "plot_cumulative_accuracy", killed)
    with pytest.raises(KeyboardInterrupt):
        write_report({"other": two_models()["base"]}, 3, tmp_path)
    assert list(tmp_path.iterdir()) == []  # not the old plot, table or metrics beside the new ones


def _with(index: int, **changes) -> list[dict]:
    rows = hand_made_rows()
    rows[index] = {**rows[index], **changes}
    return rows


@pytest.mark.parametrize(
    ("rows", "max_turns", "message"),
    [
        (hand_made_rows(), 2, r"row 1 \(prompt_id 'third'\): correct has 3 turns; expected 1 to max_turns=2"),
        (hand_made_rows(), 4, r"row 2 \(prompt_id 'repeats'\): never correct yet stopped after 3 turns"),
        (_with(0, t_star=2), 3, r"row 0 \(prompt_id 'first'\): t_star is 2 but the first correct turn .* is 1"),
        (_with(2, correct=[False, True, False], t_star=2), 3, r"went on after its first correct turn 2 to 3 turns"),
        (_with(3, num_turns=2), 3, r"'format'\): num_turns is 2 but correct has 3 turns"),
        (_with(3, format_failures=[False, False]), 3, r"format_failures has 2 turns; expected 3"),
        (_with(3, answer_norms=["7"]), 3, r"answer_norms has 1 answers; expected 2 parsable turns"),
        (_with(3, cut_off=[False]), 3, r"cut_off has 1 turns; expected a flag for each of the 3 turns"),
        (_with(3, cut_off=True), 3, r"cut_off is True; expected a flag for each of the 3 turns"),
        (_with(1, prompt_id="first"), 3, r"row 1 \(prompt_id 'first'\): prompt_id already used by row 0"),
        (_with(0, format_failures=[True], answer_norms=[]), 3, r"'first'\): a turn is both correct and a format failure"),
        (_with(3, format_failures=None), 3, r"'format'\): format_failures is None; expected a list without nulls"),
        (_with(3, format_failures=[False, None, False]), 3, r"format_failures is \[False, None, False\]; expected a list"),
        (_with(2, correct=[None, None, None]), 3, r"'repeats'\): correct is \[None, None, None\]; expected a list"),
        (_with(2, completion_tokens=None), 3, r"'repeats'\): completion_tokens is None; expected a whole number"),
        (_with(2, completion_tokens=True), 3, r"'repeats'\): completion_tokens is True; expected a whole number"),
        ([], 3, r"no trajectory rows"),
        (hand_made_rows(), 0, r"max_turns is 0"),
    ],
)
def test_bad_rows_raise_a_clear_error(rows: list[dict], max_turns: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        episode_metrics(rows, max_turns)


def test_rows_from_pandas_hold_arrays_numpy_integers_and_nan_for_null() -> None:
    rows = pa.Table.from_pylist(hand_made_rows()).to_pandas().to_dict("records")
    assert episode_metrics(rows, 3) == episode_metrics(hand_made_rows(), 3)


def test_missing_column_is_named() -> None:
    table = pa.Table.from_pylist(hand_made_rows()).drop_columns([schema.T_STAR])
    with pytest.raises(schema.MissingColumnsError, match=r"evaluation stage needs column\(s\) \['t_star'\]"):
        episode_metrics(table, 3)
    rows = hand_made_rows()
    del rows[1][schema.COMPLETION_TOKENS]
    with pytest.raises(schema.MissingColumnsError, match=r"row 1: the evaluation stage .*\['completion_tokens'\]"):
        episode_metrics(rows, 3)

