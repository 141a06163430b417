"""The weights stage: returns, per-group weights, modes, diagnostics, the file entry and the Ray Data map."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_ray import schema
from drift_ray.config import WeightsConfig
from drift_ray.weights import (
    add_weights,
    compute_weights,
    diagnostics_path,
    first_correct_turn,
    group_weights,
    invalid_conversations,
    invalid_weights,
    reached_correct,
    trajectory_returns,
    weight_diagnostics,
    weight_warnings,
    weights_file,
)

AUTHORS_SAMPLE = Path(__file__).parent / "fixtures" / "authors_sample.jsonl"


def _table(rows: list[dict]) -> pa.Table:
    """Weights input from rows given as (prompt, rewards, penalty, answers[, extra columns])."""
    return pa.Table.from_pylist(
        [
            {
                schema.TRAJECTORY_ID: f"{r['prompt']}/{k}",
                schema.PROMPT_ID: r["prompt"],
                schema.TURN_REWARDS: [float(x) for x in r["rewards"]],
                schema.FORMAT_PENALTY: float(r.get("penalty", 0.0)),
                schema.ANSWER_NORMS: r.get("answers", []),
                **r.get("extra", {}),
            }
            for k, r in enumerate(rows)
        ]
    )


# --- returns ------------------------------------------------------------------------------------------


def test_returns_by_hand():
    table = _table(
        [
            {"prompt": "a", "rewards": [0, 0, 1], "answers": ["1", "2", "3"]},  # γ² = 0.81
            {"prompt": "a", "rewards": [0, 0, 0], "answers": ["6", "6", "6"]},  # −0.5·(1 − 1/3)
            {"prompt": "a", "rewards": [0, 0, 0], "penalty": -0.1, "answers": ["7", "7"]},  # −0.1 − 0.5·½
            {"prompt": "a", "rewards": [0, 0], "penalty": -0.2, "answers": []},  # no answer: no repetition term
            {"prompt": "a", "rewards": [1], "answers": ["", None, "4"]},  # blanks are not answers
        ]
    )
    returns = trajectory_returns(table, gamma=0.9, rep_lambda=0.5)
    np.testing.assert_allclose(returns, [0.81, -1 / 3, -0.35, -0.2, 1.0], rtol=0, atol=1e-12)
    assert returns.dtype == np.float64


def test_gamma_zero_counts_only_the_first_turn():
    table = _table([{"prompt": "a", "rewards": [1, 1]}, {"prompt": "a", "rewards": [0, 1]}])
    np.testing.assert_array_equal(trajectory_returns(table, gamma=0.0, rep_lambda=0.5), [1.0, 0.0])


def test_format_penalty_repriced_from_format_failures():
    failures = schema.FORMAT_FAILURES
    table = _table(
        [
            {"prompt": "a", "rewards": [0, 0, 1], "penalty": -0.1, "extra": {failures: [True, False, True]}},
            {"prompt": "a", "rewards": [0], "penalty": -0.1, "extra": {failures: [False]}},
        ]
    )
    np.testing.assert_allclose(trajectory_returns(table, 0.9, 0.5, format_penalty=-0.5), [0.81 - 1.0, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match=rf"weights.format_penalty.*'{schema.FORMAT_FAILURES}'.*1 of 2 rows"):
        one_missing = table.set_column(table.schema.get_field_index(failures), failures, pa.array([[True], None]))
        trajectory_returns(one_missing, 0.9, 0.5, -0.5)
    with pytest.raises(ValueError, match=schema.FORMAT_FAILURES):
        trajectory_returns(table.drop_columns([schema.FORMAT_FAILURES]), 0.9, 0.5, -0.5)


def test_non_finite_return_of_an_in_memory_table_is_refused():
    table = _table([{"prompt": "a", "rewards": [0]}, {"prompt": "b", "rewards": [math.nan]}])
    with pytest.raises(ValueError, match=r"^trajectory 'b/1' has a return of nan; expected a finite reward"):
        trajectory_returns(table, 0.9, 0.5)
    # A table without trajectory ids: by row.
    with pytest.raises(ValueError, match=r"^row 2 \(prompt 'b'\) has a return of nan; expected a finite reward"):
        trajectory_returns(table.drop_columns([schema.TRAJECTORY_ID]), 0.9, 0.5)
    # A null list may keep values behind it in an Arrow array built from offsets; it still holds none.
    offsets, values = pa.array([0, 1, 3], pa.int32()), pa.array([0.0, 1.0, 1.0])
    hidden = pa.ListArray.from_arrays(offsets, values, mask=pa.array([False, True]))
    for no_turns in (pa.array([[0.0], []]), pa.array([[0.0], None], pa.list_(pa.float64())), hidden):
        # as a shard read without read_trajectories' checks can hold
        table = _table([{"prompt": "a", "rewards": [0]}, {"prompt": "b", "rewards": [0]}])
        table = table.set_column(table.schema.get_field_index(schema.TURN_REWARDS), schema.TURN_REWARDS, no_turns)
        with pytest.raises(ValueError, match=r"^trajectory 'b/1' has no turns; .* at least one"):
            trajectory_returns(table, 0.9, 0.5)


def test_answers_behind_a_null_list_do_not_count():
    offsets, values = pa.array([0, 2, 4], pa.int32()), pa.array(["1", "1", "2", "3"])
    hidden = pa.ListArray.from_arrays(offsets, values, mask=pa.array([False, True]))
    table = _table([{"prompt": "a", "rewards": [0, 0]}, {"prompt": "a", "rewards": [1]}])
    index = table.schema.get_field_index(schema.ANSWER_NORMS)
    nulls = table.set_column(index, schema.ANSWER_NORMS, pa.array([["1", "1"], None], pa.list_(pa.string())))
    returns = trajectory_returns(table.set_column(index, schema.ANSWER_NORMS, hidden), 0.9, 0.5)
    np.testing.assert_allclose(returns, trajectory_returns(nulls, 0.9, 0.5))
    np.testing.assert_allclose(returns, [-0.25, 1.0])


# --- weights ------------------------------------------------------------------------------------------


def test_invalid_weights_are_the_null_nan_infinite_and_negative_ones():
    weights = [1.0, float("nan"), float("inf"), -0.5, None, 0.0, 2.5]
    table = pa.table({schema.TRAJECTORY_ID: [f"p/{k}" for k in range(7)], schema.WEIGHT: weights, "other": range(7)})
    invalid = invalid_weights(table)
    assert invalid.column_names == [schema.TRAJECTORY_ID, schema.WEIGHT]
    assert invalid.column(schema.TRAJECTORY_ID).to_pylist() == ["p/1", "p/2", "p/3", "p/4"]
    integers = pa.table({schema.TRAJECTORY_ID: ["a", "b"], schema.WEIGHT: pa.array([3, -1], pa.int64())})
    assert invalid_weights(integers).column(schema.TRAJECTORY_ID).to_pylist() == ["b"]


def test_invalid_conversations_are_those_without_text_messages_or_an_assistant_reply():
    user, reply = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    conversations = [[user, reply], [user], [], None, [{"role": "user"}, reply], [user, reply, user]]
    table = pa.table({schema.TRAJECTORY_ID: [f"p/{k}" for k in range(6)], schema.MESSAGES: conversations})
    invalid = invalid_conversations(table)
    assert invalid.column(schema.TRAJECTORY_ID).to_pylist() == ["p/1", "p/2", "p/3", "p/4"]
    assert invalid.column("problem").to_pylist() == [
        "no assistant message to train on (roles ['user'])",
        "expected a non-empty list of messages, found []",
        "expected a non-empty list of messages, found None",
        "message 1: expected text 'role' and 'content', found {'role': 'user', 'content': None}",
    ]
    assert invalid_conversations(table.slice(0, 1)).num_rows == 0
    # A null list whose offsets still span messages: they are not the row's.
    spanned = pa.ListArray.from_arrays([0, 1, 3], pa.array([user, user, reply]), mask=pa.array([True, False]))
    spanned_table = pa.table({schema.TRAJECTORY_ID: ["n", "ok"], schema.MESSAGES: spanned})
    assert invalid_conversations(spanned_table).to_pylist() == [
        {schema.TRAJECTORY_ID: "n", "problem": "expected a non-empty list of messages, found None"}
    ]
    # Content in parts, as multimodal chats write it: a column of another type, checked row by row.
    in_parts = [{"role": role, "content": [{"type": "text", "text": "x"}]} for role in ("user", "assistant")]
    table = pa.table({schema.TRAJECTORY_ID: ["a"], schema.MESSAGES: [in_parts]})
    assert invalid_conversations(table).column("problem").to_pylist() == [
        "message 1: expected text 'role' and 'content', found {'role': 'user', 'content': [{'type': 'text', 'text': 'x'}]}"
    ]


def test_cut_off_flags_that_are_not_one_per_assistant_message_are_invalid_conversations():
    user, reply = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    conversations = [[user, reply], [user, reply, user, reply], [user, reply], [user, reply], [user]]
    flags = [[True], [None, False], [True, False], None, [True]]
    table = pa.table(
        {
            schema.TRAJECTORY_ID: [f"p/{k}" for k in range(5)],
            schema.MESSAGES: conversations,
            schema.CUT_OFF: pa.array(flags, pa.list_(pa.bool_())),
        }
    )
    assert invalid_conversations(table).to_pylist() == [
        {schema.TRAJECTORY_ID: "p/2", "problem": "cut_off has 2 flags for 1 assistant message; expected one each"},
        {schema.TRAJECTORY_ID: "p/4", "problem": "no assistant message to train on (roles ['user'])"},
    ]
    # All null, as Arrow types a column that pandas wrote of Nones only: no flags.
    unknown = table.set_column(2, schema.CUT_OFF, pa.nulls(5))
    assert invalid_conversations(unknown).column(schema.TRAJECTORY_ID).to_pylist() == ["p/4"]


def test_group_weights_small_example_and_singletons():
    weights = group_weights([1.0, 0.0, 5.0], ["a", "a", "b"], beta=1.0)
    e = math.e
    np.testing.assert_allclose(weights, [2 * e / (e + 1), 2 / (e + 1), 1.0], rtol=1e-12)


def test_group_weights_keeps_integer_and_text_ids_apart():
    # NumPy would turn [1, "1"] into two equal strings: one prompt of two trajectories.
    np.testing.assert_allclose(group_weights([1.0, 0.0], np.array([7, 8]), beta=1.0), [1.0, 1.0])
    with pytest.raises(ValueError, match=r"group_weights: prompt ids must all be of one type"):
        group_weights([1.0, 0.0], [1, "1"], beta=1.0)
    with pytest.raises(ValueError, match=r"'prompt_id': 1 rows have no prompt id"):
        group_weights([1.0, 0.0], ["a", None], beta=1.0)
    assert group_weights([], [], beta=1.0).size == 0


@pytest.mark.parametrize("beta", [0.0, -0.1, math.inf, math.nan])
def test_beta_must_be_positive_and_finite(beta):
    with pytest.raises(ValueError, match=rf"weights.beta must be > 0 and finite, found {beta}"):
        group_weights([1e308, -1e308], ["a", "a"], beta)


def test_returns_must_be_finite():
    with pytest.raises(ValueError, match=r"group_weights: return 1 \(0-based\) is nan; expected finite returns"):
        group_weights([0.0, math.nan, 1.0], ["a", "a", "b"], 1.0)


def test_extreme_returns_stay_finite():
    # R/β = ±1e4: exp would overflow outside log space.
    weights = group_weights([1000.0, -1000.0, 1000.0, -1000.0], ["a", "a", "a", "b"], beta=0.1)
    assert np.isfinite(weights).all()
    np.testing.assert_allclose(weights, [1.5, 0.0, 1.5, 1.0], rtol=1e-12, atol=0)
    # R/β itself overflows to ±inf: inf − inf would give NaN weights.
    weights = group_weights([1.0, 2.0, -1.0, 2.0], ["a", "a", "a", "b"], beta=1e-320)
    np.testing.assert_allclose(weights, [0.0, 3.0, 0.0, 1.0], rtol=1e-12, atol=0)


_answers = st.lists(st.sampled_from(["1", "2", "x", "", " ", None]), max_size=5)
_trajectory = st.tuples(
    st.lists(st.floats(-2, 2), min_size=1, max_size=5),
    st.floats(-1, 0),
    _answers,
)
_groups = st.lists(st.lists(_trajectory, min_size=1, max_size=6), min_size=1, max_size=6)


def _rows(groups) -> list[dict]:
    return [
        {"prompt": f"p{g}", "rewards": rewards, "penalty": penalty, "answers": answers}
        for g, group in enumerate(groups)
        for rewards, penalty, answers in group
    ]


def _direct_return(rewards, penalty, answers, gamma, rep_lambda) -> float:
    value = sum(gamma**t * r for t, r in enumerate(rewards)) + penalty
    counted = [a for a in answers if a and a.strip()]
    if counted:
        value -= rep_lambda * (1 - len(set(counted)) / len(counted))
    return value


@settings(max_examples=60, deadline=None)
@given(_groups, st.floats(0.05, 5), st.floats(0, 1), st.floats(0, 1))
def test_weights_match_the_direct_formula(groups, beta, gamma, rep_lambda):
    rows = _rows(groups)
    cfg = WeightsConfig(beta=beta, gamma=gamma, rep_lambda=rep_lambda)
    out = compute_weights(_table(rows), cfg)

    returns = [_direct_return(r["rewards"], r["penalty"], r["answers"], gamma, rep_lambda) for r in rows]
    expected = []
    for row, ret in zip(rows, returns):
        group = [other for r, other in zip(rows, returns) if r["prompt"] == row["prompt"]]
        expected.append(math.exp(ret / beta) / (sum(math.exp(x / beta) for x in group) / len(group)))

    np.testing.assert_allclose(out.column(schema.RETURN).to_numpy(), returns, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.column(schema.WEIGHT).to_numpy(), expected, rtol=1e-9, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(_groups, st.floats(0.01, 5), st.integers(0, 2**32 - 1))
def test_weights_average_one_per_group_and_ignore_row_order(groups, beta, seed):
    table = _table(_rows(groups))
    cfg = WeightsConfig(beta=beta)
    out = compute_weights(table, cfg)
    weights = out.column(schema.WEIGHT).to_numpy()
    prompts = np.array(out.column(schema.PROMPT_ID).to_pylist())
    for prompt in set(prompts):
        assert abs(weights[prompts == prompt].mean() - 1.0) <= 1e-9

    shuffled = compute_weights(table.take(np.random.default_rng(seed).permutation(table.num_rows)), cfg)
    by_id = dict(zip(shuffled.column(schema.TRAJECTORY_ID).to_pylist(), shuffled.column(schema.WEIGHT).to_pylist()))
    np.testing.assert_allclose(
        [by_id[t] for t in out.column(schema.TRAJECTORY_ID).to_pylist()], weights, rtol=1e-12, atol=1e-15
    )


# --- modes, diagnostics -------------------------------------------------------------------------------


def _success_table() -> pa.Table:
    rows = [
        {"prompt": "a", "rewards": [0, 1], "extra": {schema.T_STAR: 2, schema.CORRECT: [False, True]}},
        {"prompt": "a", "rewards": [0, 1], "extra": {schema.T_STAR: 2, schema.CORRECT: [False, True]}},
        {"prompt": "b", "rewards": [1], "extra": {schema.T_STAR: 1, schema.CORRECT: [True]}},
        {"prompt": "b", "rewards": [0, 0], "extra": {schema.T_STAR: None, schema.CORRECT: [False, False]}},
    ]
    return _table(rows)


def test_success_is_told_by_t_star_else_by_the_verdicts_else_by_a_positive_reward():
    # The authors' math script pays for format too: a wrong answer in tags has a positive reward.
    paid_for_format = [
        {"prompt": "a", "rewards": [0.7, 3.3], "extra": {schema.T_STAR: 2, schema.CORRECT: [False, True]}},
        {"prompt": "a", "rewards": [0.7, 0.7], "extra": {schema.T_STAR: None, schema.CORRECT: [False, False]}},
    ]
    for table in (_table(paid_for_format), _table(paid_for_format).drop_columns([schema.T_STAR])):
        assert first_correct_turn(table).tolist() == [2, 0] and reached_correct(table).tolist() == [True, False]
        assert compute_weights(table, WeightsConfig(mode="success_only")).column(schema.WEIGHT).to_pylist() == [1.0, 0.0]
    rewards_only = _table(paid_for_format).drop_columns([schema.T_STAR, schema.CORRECT])
    assert first_correct_turn(rewards_only).tolist() == [1, 1]  # nothing else tells


def test_a_table_holding_part_of_a_group_is_refused_when_the_group_size_is_given():
    table = _table([{"prompt": p, "rewards": [1], "answers": ["1"]} for p in ("a", "a", "b", "b", "b")])
    assert compute_weights(table.slice(0, 4), WeightsConfig()).num_rows == 4  # without it, b's one row is a group
    with pytest.raises(RuntimeError, match="1 trajectories of prompt 'b' in one block, expected 2"):
        compute_weights(table.slice(0, 3), WeightsConfig(), group_size=2)
    with pytest.raises(RuntimeError, match="3 trajectories of prompt 'b' in one block, expected 2"):
        compute_weights(table, WeightsConfig(), group_size=2)
    assert compute_weights(table.slice(0, 4), WeightsConfig(), group_size=2).num_rows == 4


def test_modes_uniform_and_success_only():
    table = _success_table()
    uniform = compute_weights(table, WeightsConfig(mode="uniform"))
    assert uniform.column(schema.WEIGHT).to_pylist() == [1.0] * 4
    success = compute_weights(table, WeightsConfig(mode="success_only"))
    assert success.column(schema.WEIGHT).to_pylist() == [1.0, 1.0, 1.0, 0.0]
    assert success.column(schema.RETURN).to_pylist() == uniform.column(schema.RETURN).to_pylist()


def test_compute_weights_keeps_columns_and_replaces_old_weights():
    table = _success_table()
    once = compute_weights(table, WeightsConfig())
    assert once.column_names == table.column_names + [schema.RETURN, schema.WEIGHT]
    twice = compute_weights(once, WeightsConfig(mode="uniform"))
    assert twice.column_names == once.column_names
    assert twice.column(schema.WEIGHT).to_pylist() == [1.0] * 4


def test_missing_input_column_is_named():
    with pytest.raises(schema.MissingColumnsError, match=schema.ANSWER_NORMS):
        compute_weights(_table([{"prompt": "a", "rewards": [1]}]).drop_columns([schema.ANSWER_NORMS]), WeightsConfig())


def test_diagnostics_by_hand():
    table = _table(
        [
            {"prompt": "a", "rewards": [1]},
            {"prompt": "a", "rewards": [0]},
            {"prompt": "b", "rewards": [0]},
            {"prompt": "b", "rewards": [0]},
        ]
    ).append_column(schema.WEIGHT, pa.array([1.5, 0.5, 1.0, 1.0]))
    diagnostics = weight_diagnostics(table)
    assert diagnostics.pop("weight_share_by_first_correct_turn") == pytest.approx({"1": 1.5 / 4, "unsolved": 2.5 / 4})
    # Unknown without a CUT_OFF column, or a MESSAGES one.
    assert diagnostics.pop("cut_off_reply_share") is None and diagnostics.pop("cut_off_last_reply_weight_share") is None
    assert diagnostics.pop("repeated_groups_share") is None
    # ESS: a = 2² / (1.5² + 0.5²) = 1.6, b = 2² / 2 = 2; p10 of [1.6, 2] = 1.64.
    assert diagnostics == pytest.approx(
        {
            "num_trajectories": 4,
            "num_groups": 2,
            "weight_min": 0.5,
            "weight_max": 1.5,
            "weight_mean": 1.0,
            "ess_mean": 1.8,
            "ess_p10": 1.64,
            "groups_without_success_share": 0.5,
            "success_weight_share": 1.5 / 4,
        }
    )


def test_diagnostics_count_the_cut_off_replies_that_are_known():
    cut_offs = [[False, True, False], [False, False, True], [None, True], None, [None]]
    rows = [{"prompt": "a", "rewards": [0] * len(cut or [0]), "extra": {schema.CUT_OFF: cut}} for cut in cut_offs]
    table = _table(rows).append_column(schema.WEIGHT, pa.array([1.0, 2.0, 0.5, 1.0, 0.5]))
    diagnostics = weight_diagnostics(table)
    # 3 of the 7 known replies; the last reply was cut in the second trajectory (2.0) and the third (0.5), of 5.0.
    assert diagnostics["cut_off_reply_share"] == pytest.approx(3 / 7)
    assert diagnostics["cut_off_last_reply_weight_share"] == pytest.approx(2.5 / 5.0)
    unknown = _table(rows[3:]).append_column(schema.WEIGHT, pa.array([1.0, 1.0]))
    assert weight_diagnostics(unknown)["cut_off_reply_share"] is None
    all_null = _table([{**rows[0], "extra": {schema.CUT_OFF: None}}] * 2)  # typed null by Arrow
    assert pa.types.is_null(all_null.schema.field(schema.CUT_OFF).type)
    diagnostics = weight_diagnostics(all_null.append_column(schema.WEIGHT, pa.array([1.0, 1.0])))
    assert diagnostics["cut_off_reply_share"] is None


def conversation(*replies: str) -> list[dict[str, str]]:
    turns = [[{"role": "user", "content": "q" if t == 0 else "Incorrect."}, {"role": "assistant", "content": r}] for t, r in enumerate(replies)]
    return [message for turn in turns for message in turn]


def test_what_leaves_weighted_sft_nothing_to_learn_is_warned_of():
    def weighed(conversations: dict[str, list[list[str]]], solved: bool = False) -> dict:
        rows = [
            {"prompt": prompt, "rewards": [0.0] * (len(replies) - 1) + [float(solved)], "extra": {schema.MESSAGES: conversation(*replies)}}
            for prompt, group in conversations.items()
            for replies in group
        ]
        return weight_diagnostics(compute_weights(_table(rows), WeightsConfig()))

    # Prompt a's two episodes are one conversation; b's two differ in their second reply; c has one episode.
    sampled = weighed({"a": [["7"], ["7"]], "b": [["7", "8"], ["7", "9"]], "c": [["7"]]}, solved=True)
    assert sampled["repeated_groups_share"] == 0.5 and weight_warnings(sampled) == []
    repeated = weighed({"a": [["7"], ["7"]], "b": [["7", "8"], ["7", "8"]]}, solved=True)
    assert repeated["repeated_groups_share"] == 1.0
    [warning] = weight_warnings(repeated)
    assert warning.startswith("every prompt's trajectories are one conversation repeated") and "do_sample: true" in warning
    unsolved = weighed({"a": [["7"], ["8"]]})
    [warning] = weight_warnings(unsolved)
    assert warning.startswith("no trajectory of any prompt reached a correct answer: weights.mode=success_only")
    # Messages with fields beyond role and content (bytes, say) are compared by role and content.
    table = _table([{"prompt": "a", "rewards": [1]}] * 2)
    extra = [[{"role": "user", "content": "q", "raw": b"\x00"}, {"role": "assistant", "content": "7", "raw": b"\x01"}]] * 2
    table = table.append_column(schema.MESSAGES, pa.array(extra)).append_column(schema.WEIGHT, pa.array([1.0, 1.0]))
    assert weight_diagnostics(table)["repeated_groups_share"] == 1.0


def test_first_correct_turn_from_rewards_and_from_t_star():
    rows = [
        {"prompt": "a", "rewards": [0, 0, 1]},
        {"prompt": "a", "rewards": [0, 0, 0]},
        {"prompt": "a", "rewards": [1]},
        {"prompt": "b", "rewards": []},
        {"prompt": "b", "rewards": [0, 0.5, 1]},
    ]
    assert first_correct_turn(_table(rows)).tolist() == [3, 0, 1, 0, 2]
    with_t_star = _table(rows).append_column(schema.T_STAR, pa.array([3, None, 1, None, 3], pa.int64()))
    assert first_correct_turn(with_t_star).tolist() == [3, 0, 1, 0, 3]  # T_STAR wins where the table has it
    diagnostics = weight_diagnostics(with_t_star.append_column(schema.WEIGHT, pa.array([2.0, 0.0, 1.0, 0.5, 0.5])))
    assert diagnostics["weight_share_by_first_correct_turn"] == pytest.approx({"1": 0.25, "3": 0.625, "unsolved": 0.125})


# --- the file entry -----------------------------------------------------------------------------------


def test_weights_file_on_the_authors_sample(tmp_path):
    output = tmp_path / "out" / "weighted.parquet"
    diagnostics = weights_file(AUTHORS_SAMPLE, output, WeightsConfig())
    table = pq.read_table(output)
    assert table.column(schema.SOURCE_LINE).to_pylist() == [1, 2, 3, 4, 5, 6]
    # Line 4 solves at turn 3 with distinct answers: γ² = 0.81.
    assert table.column(schema.RETURN)[3].as_py() == pytest.approx(0.81)
    assert json.loads(diagnostics_path(output).read_text()) == diagnostics
    assert diagnostics["num_groups"] == 2 and diagnostics["num_trajectories"] == 6
    assert sorted(p.name for p in output.parent.iterdir()) == ["weighted.diagnostics.json", "weighted.parquet"]

    # Redone with another β and stopped before its table is written (here by an error; a killed process
    # stops the same way, past the cleanup): the earlier table is not left to pass for the new one.
    def stopped(*args):
        assert diagnostics_path(output).exists() and not output.exists()  # new diagnostics, no old table
        raise KeyboardInterrupt

    with mock.patch("drift_ray.weights.write_table_atomic", side_effect=stopped), pytest.raises(KeyboardInterrupt):
        weights_file(AUTHORS_SAMPLE, output, WeightsConfig(beta=0.5))
    assert list(output.parent.iterdir()) == []


_GOOD = {
    "prompt_id": "q1",
    "gold": "4",
    "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<answer>4</answer>"}],
    "verifier": {"t1": 1},
    "turn_rewards": {"t1": 1.0},
    "reward_details": {
        "t1": {"env_reward": 1.0, "format_penalty": 0.0, "actions": ["4"], "parsed_actions": ["4"], "info": {}}
    },
    "t_star": 1,
    "answer_norms": ["4"],
    "format_penalty": 0.0,
}


def _without(key: str) -> dict:
    return {k: v for k, v in _GOOD.items() if k != key}


@pytest.mark.parametrize(
    "line_2, message",
    [
        ('{"prompt_id": "q1", "turn_rewards": ', r"not valid JSON"),
        (
            json.dumps({"prompt_id": "q1", "trajectory_id": "q1/0", "turn_rewards": [1.0], "answer_norms": []}),
            r"field 'format_penalty'.*found no such field on the line$",
        ),
        (  # not taken for a null one
            json.dumps({**_GOOD, "answer_norms": None}),
            r"field 'answer_norms': expected a list of strings, found None$",
        ),
        (json.dumps(_without("answer_norms")), r"field 'answer_norms': expected a list of strings, found no such field on the line$"),
        (json.dumps(_without("prompt_id")), r"field 'prompt_id': expected a string or an integer, found no such field on the line$"),
        (
            json.dumps({**_GOOD, "turn_rewards": "abc"}),
            r"field 'turn_rewards': expected a mapping t1\.\.tN of numbers or a list of numbers, found 'abc'",
        ),
        (json.dumps({**_GOOD, "prompt_id": 7.0}), r"field 'prompt_id': expected a string or an integer, found 7\.0"),
        (json.dumps({**_GOOD, "prompt_id": True}), r"field 'prompt_id': expected a string or an integer, found True"),
        (
            json.dumps({**_GOOD, "turn_rewards": {"t1": float("nan")}}),
            r"field 'turn_rewards': expected finite numbers, found nan at turn 1",
        ),
        (json.dumps({**_GOOD, "format_penalty": float("-inf")}), r"field 'format_penalty'.*-inf"),
        (
            json.dumps({**_GOOD, "turn_rewards": {"t1": 0.0, "t3": 1.0}}),
            r"field 'turn_rewards': expected keys t1\.\.tN.*\['t1', 't3'\]",
        ),
        (json.dumps({**_GOOD, "verifier": {"t1": 2}}), r"field 'verifier\.t1': expected 0 or 1, found 2"),
        (json.dumps({**_GOOD, "verifier": {"t1": 1, "t2": 0}}), r"field 'verifier': expected the 1 turn\(s\) of 'turn_rewards', found 2"),
        (
            json.dumps({**_GOOD, "reward_details": {"t1": {"format_penalty": None}}}),
            r"field 'reward_details\.t1\.format_penalty': expected a finite number, found None",
        ),
        (json.dumps({**_GOOD, "answer_norms": "4"}), r"field 'answer_norms': expected a list of strings"),
        (json.dumps({**_GOOD, "t_star": 3}), r"field 't_star'"),
        (
            json.dumps(
                {
                    **_without("reward_details"),
                    "messages": [*_GOOD["messages"], {"role": "user", "content": "No."}, {"role": "assistant", "content": "4"}],
                    "verifier": {"t1": 0, "t2": 1},
                    "turn_rewards": {"t1": 0.0, "t2": 1.0},
                }
            ),
            r"field 't_star': expected 2, the first turn 'verifier' marks correct, found 1",
        ),
        (
            json.dumps({**_GOOD, "verifier": {"t1": 0}}),
            r"field 't_star': expected null, as 'verifier' marks no turn correct, found 1",
        ),
        # Our format: the episode stops at its first correct answer, which t_star and the verdicts agree on.
        (
            json.dumps({"prompt_id": "q1", "trajectory_id": "q1/9", "turn_rewards": [1.0, 1.0], "t_star": 1,
                        "answer_norms": [], "format_penalty": 0.0}),
            r"field 't_star': expected the last of its 2 turns: an episode stops at its first correct answer, found 1",
        ),
        (
            json.dumps({"prompt_id": "q1", "trajectory_id": "q1/9", "turn_rewards": [0.0, 1.0], "correct": [False, True],
                        "t_star": None, "answer_norms": [], "format_penalty": 0.0}),
            r"field 't_star': expected 2, the first turn 'correct' marks correct, found None",
        ),
        (
            json.dumps({**_GOOD, "sample_index": 1.7}),
            r"field 'sample_index': expected a value of type int64, found 1\.7",
        ),
        ("[1, 2]", r"expected a JSON object, found list"),
        # json keeps the last of a key written twice, silently.
        (json.dumps(_GOOD).replace('"t_star": 1', '"t_star": 1, "t_star": null'), r"key 't_star' is written twice in one object"),
        (
            json.dumps({**_GOOD, "turn_rewards": {"t1": 1.0}}).replace('{"t1": 1.0}', '{"t1": 0.0, "t1": 1.0}'),
            r"key 't1' is written twice in one object",
        ),
        # Python reads it, but no float holds it.
        (json.dumps({**_GOOD, "turn_rewards": {"t1": 10**400}}), r"field 'turn_rewards': expected finite numbers, found 1000"),
        (json.dumps({**_GOOD, "format_penalty": 0.1}), r"field 'format_penalty': expected a finite number <= 0 .*found 0\.1"),
        # Each reward finite, the return not.
        (
            json.dumps({**_GOOD, "turn_rewards": {"t1": 1e308}, "format_penalty": -1e308}),
            r"field 'turn_rewards': expected rewards whose absolute sum, with that of 'format_penalty', is a finite number, found \[1e\+308\]",
        ),
        # What the weights pass on to weighted SFT, which would fail at the row's step, hours in.
        (
            json.dumps({**_GOOD, "messages": [{"role": "user", "content": None}, _GOOD["messages"][1]]}),
            r"field 'messages': message 1: expected text 'role' and 'content', found \{'role': 'user', 'content': None\}",
        ),
        (
            json.dumps({**_GOOD, "messages": _GOOD["messages"][:1]}),
            r"field 'messages': no assistant message to train on \(roles \['user'\]\)",
        ),
        # Content that Arrow cannot type as text: named by its message, not by the column's type.
        (
            json.dumps({**_GOOD, "messages": [_GOOD["messages"][0], {"role": "assistant", "content": 5}]}),
            r"field 'messages': message 2: expected text 'role' and 'content', found \{'role': 'assistant', 'content': 5\}$",
        ),
        (
            json.dumps({**_GOOD, "sample_index": 0}),  # the trajectory id of line 1's sample
            r"trajectory_id 'q1/0' is also that of .*data\.jsonl:1; weighted SFT needs one row per trajectory",
        ),
        # Our own format, which the authors' checks do not cover.
        (
            json.dumps({"prompt_id": "q1", "trajectory_id": "q1/9", "turn_rewards": [0.0], "t_star": 2, "answer_norms": [], "format_penalty": 0.0}),
            r"field 't_star': expected null or a turn number from 1 to the turns of 'turn_rewards', found 2 for 1 turn\(s\)",
        ),
        (
            json.dumps({"prompt_id": "q1", "trajectory_id": "q1/9", "turn_rewards": [1.0], "correct": [False, True], "answer_norms": [], "format_penalty": 0.0}),
            r"field 'correct': expected a list of one value per turn of 'turn_rewards', found \[False, True\] for 1 turn",
        ),
        (
            json.dumps({"prompt_id": "q1", "trajectory_id": "q1/9", "turn_rewards": [0.0], "correct": ["no"], "t_star": None,
                        "answer_norms": [], "format_penalty": 0.0}),
            r"field 'correct': expected true or false for each turn, found \['no'\]",
        ),
        (
            json.dumps({"prompt_id": "q1", "trajectory_id": None, "turn_rewards": [1.0], "correct": [True], "t_star": 1, "answer_norms": [], "format_penalty": 0.0}),
            r"field 'trajectory_id': expected a value, found null",  # written null: not made up
        ),
    ],
)
def test_weights_file_refuses_bad_lines_and_writes_nothing(tmp_path, line_2, message):
    source = tmp_path / "in" / "data.jsonl"
    source.parent.mkdir()
    source.write_text("\n".join([json.dumps(_GOOD), line_2, json.dumps(_GOOD)]) + "\n")
    out_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=r"data\.jsonl:2: " + message):
        weights_file(source, out_dir / "weighted.parquet", WeightsConfig())
    assert not out_dir.exists()
    assert [p.name for p in source.parent.iterdir()] == ["data.jsonl"]


def test_integer_prompt_ids_are_read_as_the_task_files_read_them(tmp_path):
    """As text: the trajectories of a task file with integer ids, written by another tool, weigh as ours do."""
    lines = [{**_GOOD, "prompt_id": prompt_id, "verifier": {"t1": correct}, "turn_rewards": {"t1": float(correct)},
              "t_star": 1 if correct else None} for prompt_id, correct in ((7, 1), (7, 0), (8, 1), (8, 1))]
    as_text = [{**line, "prompt_id": str(line["prompt_id"])} for line in lines]
    weighted = {}
    for name, rows in (("numbers", lines), ("text", as_text)):
        source = tmp_path / f"{name}.jsonl"
        source.write_text("".join(json.dumps(row) + "\n" for row in rows))
        weights_file(source, tmp_path / f"{name}.parquet", WeightsConfig())
        weighted[name] = pq.read_table(tmp_path / f"{name}.parquet")
    assert weighted["numbers"].column(schema.PROMPT_ID).to_pylist() == ["7", "7", "8", "8"]
    assert weighted["numbers"].column(schema.WEIGHT) == weighted["text"].column(schema.WEIGHT)
    # Parquet: an integer column, as pandas writes one, and a dictionary (category) column.
    table = pq.read_table(tmp_path / "text.parquet").drop_columns([schema.RETURN, schema.WEIGHT])
    for prompt_ids in (pa.array([7, 7, 8, 8]), pa.array(["7", "7", "8", "8"]).dictionary_encode()):
        pq.write_table(table.set_column(table.schema.get_field_index(schema.PROMPT_ID), schema.PROMPT_ID, prompt_ids),
                       tmp_path / "typed.parquet")
        weights_file(tmp_path / "typed.parquet", tmp_path / "typed-weighted.parquet", WeightsConfig())
        again = pq.read_table(tmp_path / "typed-weighted.parquet")
        assert again.column(schema.PROMPT_ID).to_pylist() == ["7", "7", "8", "8"]
        assert again.column(schema.WEIGHT) == weighted["text"].column(schema.WEIGHT)
    for other_type in (pa.array([True, True, False, False]), pa.array([7.0, 7.0, 8.0, 8.0]), pa.array([b"7", b"7", b"8", b"8"])):
        pq.write_table(table.set_column(table.schema.get_field_index(schema.PROMPT_ID), schema.PROMPT_ID, other_type),
                       tmp_path / "typed.parquet")
        with pytest.raises(ValueError, match=rf"typed\.parquet: field 'prompt_id': expected a column of text or integers, found type {other_type.type}"):
            weights_file(tmp_path / "typed.parquet", tmp_path / "typed-weighted.parquet", WeightsConfig())
    # Both spellings of one id in a file: one prompt, or two that the file tells apart?
    for first, second, shown in ((lines[0], as_text[1], "'7' is read as the same prompt '7' as line 1's 7"),
                                 (as_text[0], lines[1], "7 is read as the same prompt '7' as line 1's '7'")):
        source = tmp_path / "mixed.jsonl"
        source.write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n")
        with pytest.raises(ValueError, match=rf"mixed\.jsonl:2: field 'prompt_id': {shown}: give each prompt's id one way"):
            weights_file(source, tmp_path / "mixed.parquet", WeightsConfig())


def test_weights_file_will_not_replace_or_join_its_input(tmp_path):
    source = tmp_path / "data.parquet"
    weights_file(AUTHORS_SAMPLE, source, WeightsConfig())  # a weighted table is a trajectory file too
    (tmp_path / "data.diagnostics.json").unlink()
    written = source.read_bytes()
    os.link(source, tmp_path / "linked.parquet")
    refused = r"the output would replace or join the input it is computed from"
    for output in (tmp_path / "." / "data.parquet", tmp_path / "linked.parquet"):
        with pytest.raises(ValueError, match=refused):
            weights_file(source, output, WeightsConfig())
    # Nor its diagnostics beside it: an input named so would be lost the same way.
    diagnostics_named = tmp_path / "w.diagnostics.json"
    os.link(source, diagnostics_named)
    with pytest.raises(ValueError, match=r"w\.diagnostics\.json: the diagnostics beside it would replace or join the input"):
        weights_file(diagnostics_named, tmp_path / "w.parquet", WeightsConfig())
    assert source.read_bytes() == written
    # Inside a directory of shards, the output would be read as one more shard next time.
    with pytest.raises(ValueError, match=r"shards/weighted\.parquet: " + refused):
        weights_file(tmp_path, tmp_path / "shards" / "weighted.parquet", WeightsConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.parquet", "linked.parquet", "w.diagnostics.json"]


def test_weights_file_writes_parquet_only_where_asked(tmp_path):
    (tmp_path / "dir.parquet").mkdir()
    with pytest.raises(ValueError, match=r"weighted\.jsonl: the output is a Parquet file; give a path ending in \.parquet"):
        weights_file(AUTHORS_SAMPLE, tmp_path / "weighted.jsonl", WeightsConfig())
    for directory in (tmp_path / "dir.parquet", f"{tmp_path}/new.parquet/"):
        with pytest.raises(ValueError, match=r"\.parquet/?: the output names a directory"):
            weights_file(AUTHORS_SAMPLE, directory, WeightsConfig())
    for role, paths in (("input", ("", tmp_path / "w.parquet")), ("output", (AUTHORS_SAMPLE, " "))):
        with pytest.raises(ValueError, match=f"the {role} path is empty"):  # else the working directory
            weights_file(*paths, WeightsConfig())
    assert [p.name for p in tmp_path.iterdir()] == ["dir.parquet"]


def test_weights_file_refuses_empty_input_and_bad_beta(tmp_path):
    out_dir = tmp_path / "out"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no trajectories"):
        weights_file(empty, out_dir / "w.parquet", WeightsConfig())
    # The config refuses β ≤ 0; a config built without validation still cannot slip it through.
    with pytest.raises(ValueError, match=r"weights\.beta must be > 0 and finite, found 0\.0"):
        weights_file(AUTHORS_SAMPLE, out_dir / "w.parquet", WeightsConfig.model_construct(beta=0.0))
    assert not out_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


# --- Ray Data -----------------------------------------------------------------------------------------


@pytest.mark.ray
def test_add_weights_groups_interleaved_blocks(ray_cluster):
    rng = np.random.default_rng(0)
    prompts, k = 6, 4
    # Row i belongs to prompt i % 6: each of the 4 blocks holds one trajectory of every prompt.
    table = _table(
        [
            {
                "prompt": f"p{i % prompts}",
                "rewards": rng.integers(0, 2, rng.integers(1, 4)).tolist(),
                "answers": [str(rng.integers(3))],
            }
            for i in range(prompts * k)
        ]
    )
    blocks = [table.slice(b * prompts, prompts) for b in range(k)]
    ds = ray_cluster.data.from_arrow(blocks)
    cfg = WeightsConfig(beta=0.5)
    whole = compute_weights(table, cfg)
    expected = dict(zip(whole.column(schema.TRAJECTORY_ID).to_pylist(), whole.column(schema.WEIGHT).to_pylist()))

    def weights_by_id(result) -> dict[str, float]:
        return {row[schema.TRAJECTORY_ID]: row[schema.WEIGHT] for row in result.take_all()}

    assert len(set(expected.values())) > 1
    # Blocks that split groups give wrong weights (every block sees groups of one) ...
    assert set(weights_by_id(add_weights(ds, cfg, whole_groups=True)).values()) == {1.0}
    # ... which the group size, when given, refuses ...
    with pytest.raises(Exception, match=f"1 trajectories of prompt 'p.' in one block, expected {k}"):
        add_weights(ds, cfg, whole_groups=True, group_size=k).materialize()
    # ... and hash partitioning by prompt id gathers each group into one block.
    grouped = weights_by_id(add_weights(ds, cfg, whole_groups=False, group_size=k))
    assert grouped.keys() == expected.keys()
    for trajectory_id, weight in expected.items():
        assert grouped[trajectory_id] == pytest.approx(weight, rel=1e-12)
