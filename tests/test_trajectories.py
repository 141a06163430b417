"""Trajectory files: the authors' JSONL import, our JSONL and Parquet, errors on bad values, atomic writes."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.numpy

from drift_ray import schema
from drift_ray.config import EpisodeConfig
from drift_ray.episode import Episode, Generation, first_messages
from drift_ray.prompts import Problem
from drift_ray.trajectories import (
    DirectoryInUseError,
    TrajectoryFileError,
    _umask,
    conversations_fingerprint,
    exclusive_lock,
    publish_directory,
    read_trajectories,
    require_parquet,
    require_same_settings,
    weighted_fingerprint,
    write_json_atomic,
    write_table_atomic,
)
from drift_ray.verifiers import ExactVerifier

AUTHORS_SAMPLE = Path(__file__).parent / "fixtures" / "authors_sample.jsonl"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """`rows` as a JSONL file at `path`, one JSON object per line."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _episode_rows() -> list[dict]:
    """Rows as our rollouts write them: a solve at turn 2 and a run of format failures and repeats."""
    cfg = EpisodeConfig(max_turns=3)
    rows = []
    replies_of = [
        ["<answer>5</answer>", "<answer>7</answer>"],
        ["no idea", "<answer>5</answer>", "<answer> 5</answer>"],
    ]
    for k, replies in enumerate(replies_of):
        problem = Problem("p1", "What is 3 + 4?", "7")
        episode = Episode(problem, k, first_messages(problem.question, cfg))
        for reply in replies:
            episode.take_turn(Generation(reply, 10, 3), ExactVerifier(), cfg)
        rows.append(episode.to_row(cfg, "demo"))
    return rows


def test_authors_file_becomes_lists_in_turn_order_with_source_lines():
    table = read_trajectories(AUTHORS_SAMPLE)
    records = [json.loads(line) for line in AUTHORS_SAMPLE.read_text().splitlines()]
    rows = table.to_pylist()

    assert [r[schema.SOURCE_LINE] for r in rows] == [1, 2, 3, 4, 5, 6]
    # The authors' lines carry no id: the k-th line of a prompt is its sample k.
    assert [r[schema.TRAJECTORY_ID] for r in rows] == [f"math-{p}/{k}" for p in (17, 42) for k in range(3)]
    assert [r[schema.SAMPLE_INDEX] for r in rows] == [0, 1, 2, 0, 1, 2]
    for row, record in zip(rows, records):
        # The turns played: the details' (rewards and verdicts are padded with zeros to 3 turns, as theirs are).
        turns = sorted(record["reward_details"], key=lambda key: int(key[1:]))
        assert len(record["turn_rewards"]) == 3
        assert row[schema.TURN_REWARDS] == [record["turn_rewards"][t] for t in turns]
        assert row[schema.CORRECT] == [record["verifier"][t] == 1 for t in turns]
        assert row[schema.FORMAT_FAILURES] == [record["reward_details"][t]["format_penalty"] != 0 for t in turns]
        assert json.loads(row[schema.REWARD_DETAILS]) == record["reward_details"]
        assert row[schema.T_STAR] == record["t_star"]
        assert row[schema.MESSAGES] == record["messages"]
        assert row[schema.PROMPT_ID] == record["prompt_id"]
        assert row[schema.GOLD] == record["gold"]
    # Line 6 lists its turns as t2, t1: the lists follow the turn number, not the key order.
    assert rows[5][schema.TURN_REWARDS] == [0.0, 1.0]
    assert rows[5][schema.CORRECT] == [False, True]
    assert rows[5][schema.FORMAT_FAILURES] == [True, False]
    # Line 3 records its format failure as an empty answer: not an answer.
    assert rows[2][schema.ANSWER_NORMS] == ["7", "7"]
    assert table.schema.field(schema.TURN_REWARDS).type == pa.list_(pa.float64())


def test_authors_line_without_optional_fields(tmp_path):
    record = {"prompt_id": "q", "turn_rewards": {"t1": 0.0, "t2": 1.0}, "answer_norms": ["a", None, "b"]}
    record["format_penalty"] = 0.0
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n")
    table = read_trajectories(path)
    row = table.to_pylist()[0]
    assert row[schema.TURN_REWARDS] == [0.0, 1.0]
    assert row[schema.ANSWER_NORMS] == ["a", "b"]
    assert schema.CORRECT not in table.column_names
    assert schema.FORMAT_FAILURES not in table.column_names


def test_authors_details_without_one_turns_format_penalty_leave_the_format_failures_unknown(tmp_path):
    # Used only to re-price the penalty, so a weighting by the line's own format_penalty reads the line.
    details = {"t1": {"format_penalty": -0.1}, "t2": {"env_reward": 1.0}}
    record = {"prompt_id": "q", "turn_rewards": {"t1": 0.0, "t2": 1.0}, "answer_norms": ["a", "b"], "reward_details": details}
    path = tmp_path / "data.jsonl"
    every_turn = {"t1": {"format_penalty": -0.1}, "t2": {"format_penalty": 0}}
    write_jsonl(path, [{**record, "format_penalty": -0.1}, {**record, "format_penalty": -0.1, "reward_details": every_turn}])
    rows = read_trajectories(path).to_pylist()
    assert [row[schema.FORMAT_FAILURES] for row in rows] == [None, [True, False]]
    assert json.loads(rows[0][schema.REWARD_DETAILS]) == details


def test_an_authors_line_with_its_own_sample_index_gets_the_trajectory_id_of_that_sample(tmp_path):
    record = {"prompt_id": "q", "turn_rewards": {"t1": 1.0}, "answer_norms": ["a"], "format_penalty": 0.0}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({**record, "sample_index": 5}) + "\n" + json.dumps(record) + "\n")
    rows = read_trajectories(path).to_pylist()
    assert [(r[schema.TRAJECTORY_ID], r[schema.SAMPLE_INDEX]) for r in rows] == [("q/5", 5), ("q/1", 1)]


def test_our_jsonl_reads_like_our_parquet(tmp_path):
    rows = _episode_rows()
    parquet = tmp_path / "rollouts.parquet"
    write_table_atomic(pa.Table.from_pylist(rows), parquet)
    jsonl = tmp_path / "rollouts.jsonl"
    write_jsonl(jsonl, rows)

    from_parquet = read_trajectories(parquet).to_pylist()
    from_jsonl = read_trajectories(jsonl).to_pylist()

    assert [r.pop(schema.SOURCE_LINE) for r in from_jsonl] == [1, 2]
    assert from_jsonl == from_parquet == rows


def test_parquet_without_trajectory_ids_gets_them_as_jsonl_does(tmp_path):
    """Else `drift-ray weights` wrote weights that `drift-ray train` refused for want of their ids."""
    rows = [{k: v for k, v in row.items() if k not in (schema.TRAJECTORY_ID, schema.SAMPLE_INDEX)} for row in _episode_rows()]
    jsonl = tmp_path / "rollouts.jsonl"
    write_jsonl(jsonl, rows)
    write_table_atomic(pa.Table.from_pylist(rows[1:]), tmp_path / "dir" / "part-b.parquet")
    write_table_atomic(pa.Table.from_pylist(rows[:1]), tmp_path / "dir" / "part-a.parquet")
    from_parquet = read_trajectories(tmp_path / "dir").to_pylist()
    from_jsonl = [{k: v for k, v in r.items() if k != schema.SOURCE_LINE} for r in read_trajectories(jsonl).to_pylist()]
    assert from_parquet == from_jsonl
    assert [(r[schema.TRAJECTORY_ID], r[schema.SAMPLE_INDEX]) for r in from_parquet] == [("p1/0", 0), ("p1/1", 1)]
    # A sample_index of its own names the samples.
    own = tmp_path / "own.parquet"
    write_table_atomic(pa.Table.from_pylist([{**row, schema.SAMPLE_INDEX: 7 - k} for k, row in enumerate(rows)]), own)
    assert [r[schema.TRAJECTORY_ID] for r in read_trajectories(own).to_pylist()] == ["p1/7", "p1/6"]
    write_table_atomic(pa.Table.from_pylist([{**row, schema.SAMPLE_INDEX: k or None} for k, row in enumerate(rows)]), own)
    with pytest.raises(TrajectoryFileError, match=f"^{re.escape(str(own))}: row 1: field 'sample_index': expected a value, found null$"):
        read_trajectories(own)
    write_table_atomic(pa.Table.from_pylist([{**row, schema.SAMPLE_INDEX: "0"} for row in rows]), own)
    with pytest.raises(TrajectoryFileError, match="field 'sample_index': expected a column of integers, found type string$"):
        read_trajectories(own)


def test_a_rollouts_directory_reads_as_its_shards_beside_the_manifest_and_temporary_files(tmp_path):
    rows = _episode_rows()
    write_table_atomic(pa.Table.from_pylist(rows[1:]), tmp_path / "part-b.parquet")
    write_table_atomic(pa.Table.from_pylist(rows[:1]), tmp_path / "part-a.parquet")
    write_json_atomic({"model": "demo"}, tmp_path / "manifest.json")
    (tmp_path / ".part-c.parquet.1234.tmp").write_bytes(b"PAR1 half written")
    assert read_trajectories(tmp_path).to_pylist() == rows
    for shard in tmp_path.glob("*.parquet"):
        shard.unlink()
    with pytest.raises(TrajectoryFileError, match="no \\*\\.parquet file in the directory"):
        read_trajectories(tmp_path)
    # JSONL beside the shards, or alone: named, not left out or taken for no file at all.
    write_table_atomic(pa.Table.from_pylist(rows), tmp_path / "part-a.parquet")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "b.jsonl").write_text(json.dumps(rows[0]) + "\n")
    for directory in (tmp_path, tmp_path / "more"):
        with pytest.raises(TrajectoryFileError, match=f"^{re.escape(str(tmp_path / 'more' / 'b.jsonl'))}: a directory of "
                           "trajectories is read as Parquet files alone; give a JSONL file as the input by its own path$"):
            read_trajectories(directory)


def test_mixed_formats_in_one_file_each_line_detected(tmp_path):
    ours = _episode_rows()[0]
    authors = AUTHORS_SAMPLE.read_text().splitlines()[0]
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(ours) + "\n\n" + authors + "\n")
    rows = read_trajectories(path).to_pylist()
    assert [r[schema.SOURCE_LINE] for r in rows] == [1, 3]
    assert rows[0][schema.TURN_REWARDS] == ours[schema.TURN_REWARDS]
    assert rows[1][schema.TURN_REWARDS] == [1.0]
    assert [r[schema.TRAJECTORY_ID] for r in rows] == [ours[schema.TRAJECTORY_ID], "math-17/0"]
    # A line of ours without an id gets one as the authors' lines do (weighted SFT needs one per row).
    anonymous = {k: v for k, v in ours.items() if k not in (schema.TRAJECTORY_ID, schema.SAMPLE_INDEX)}
    path.write_text(json.dumps(anonymous) + "\n" + json.dumps({**anonymous, schema.SAMPLE_INDEX: 7}) + "\n")
    rows = read_trajectories(path).to_pylist()
    prompt = ours[schema.PROMPT_ID]
    assert [(r[schema.TRAJECTORY_ID], r[schema.SAMPLE_INDEX]) for r in rows] == [(f"{prompt}/0", 0), (f"{prompt}/7", 7)]


@pytest.mark.parametrize(
    "change, field",
    [
        ({schema.FORMAT_PENALTY: float("nan")}, schema.FORMAT_PENALTY),
        ({schema.TURN_REWARDS: [0.0, float("inf")]}, schema.TURN_REWARDS),
        ({schema.TURN_REWARDS: []}, schema.TURN_REWARDS),
        ({schema.TURN_REWARDS: [1e308, 1e308, 0.0]}, schema.TURN_REWARDS),  # each finite, their sum not
        ({schema.PROMPT_ID: None}, schema.PROMPT_ID),
        ({schema.FORMAT_PENALTY: 0.5}, schema.FORMAT_PENALTY),  # a penalty added to the return is <= 0
        ({schema.T_STAR: 4}, schema.T_STAR),  # of 3 turns
        ({schema.T_STAR: float("nan")}, schema.T_STAR),  # not a null: would count as a success
        ({schema.CORRECT: [False, True]}, schema.CORRECT),
        ({schema.FORMAT_FAILURES: [True]}, schema.FORMAT_FAILURES),
        ({schema.CUT_OFF: [True, False]}, schema.CUT_OFF),
        ({schema.MESSAGES: [{"role": "user", "content": "q"}]}, schema.MESSAGES),
        ({schema.TRAJECTORY_ID: None}, schema.TRAJECTORY_ID),
    ],
)
def test_bad_parquet_value_names_file_row_and_field(tmp_path, change, field):
    rows = _episode_rows()
    rows[1] = {**rows[1], **change}
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(TrajectoryFileError, match=rf"bad\.parquet: row 2: field '{field}'"):
        read_trajectories(path)
    # In a directory of shards: the shard that holds it, and its row there.
    shards = tmp_path / "rollouts"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:1]), shards / "part-a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1:]), shards / "part-b.parquet")
    with pytest.raises(TrajectoryFileError, match=rf"rollouts/part-b\.parquet: row 1: field '{field}'"):
        read_trajectories(shards)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({schema.T_STAR: 2}, "null, as 'correct' marks no turn correct, found 2"),
        ({schema.CORRECT: [False, True, False]}, "2, the first turn 'correct' marks correct, found None"),
        # A success at turn 1 that played on: its later rewards would count in the return.
        (
            {schema.T_STAR: 1, schema.CORRECT: [True, False, False], schema.TURN_REWARDS: [1.0, 1.0, 0.0]},
            "the last of its 3 turns: an episode stops at its first correct answer, found 1",
        ),
    ],
)
def test_t_star_must_be_the_first_correct_and_last_turn_in_parquet_as_in_jsonl(tmp_path, change, expected):
    rows = _episode_rows()
    rows[1] = {**rows[1], **change}  # unsolved in 3 turns
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    write_jsonl(tmp_path / "bad.jsonl", rows)
    for where in ("bad.parquet: row 2", "bad.jsonl:2"):
        with pytest.raises(TrajectoryFileError, match=re.escape(f"{where}: field 't_star': expected {expected}")):
            read_trajectories(tmp_path / where.split(":")[0])


def test_the_field_that_says_which_turn_was_correct_is_on_every_jsonl_line_or_none(tmp_path):
    # The column the file has is read for every row (t_star, else the verdicts): a line without the field
    # would count as unsolved.
    solved = _episode_rows()[0]  # at turn 2
    without = {field: {key: value for key, value in solved.items() if key not in fields}
               for field, fields in ((schema.T_STAR, [schema.T_STAR]), (schema.CORRECT, [schema.T_STAR, schema.CORRECT]))}
    path = tmp_path / "mixed.jsonl"
    for field, giving, named in (
        (schema.T_STAR, solved, "'t_star'"),
        (schema.CORRECT, without[schema.T_STAR], "'correct' (nor 'verifier', the authors' name for it)"),
    ):
        path.write_text(json.dumps(giving) + "\n" + json.dumps(without[field]) + "\n")
        with pytest.raises(TrajectoryFileError, match=re.escape(f"mixed.jsonl:2: no field {named}, which line 1 gives")):
            read_trajectories(path)
        path.write_text(json.dumps(without[field]) + "\n" + json.dumps({**without[field], schema.TRAJECTORY_ID: "p1/9"}) + "\n")
        assert read_trajectories(path).num_rows == 2  # on no line: the turn is read from the others
    # Verdicts on some lines only, where every line gives t_star, which is what is read: accepted.
    path.write_text(json.dumps(solved) + "\n" + json.dumps({**solved, schema.TRAJECTORY_ID: "p1/9", schema.CORRECT: None}) + "\n")
    assert read_trajectories(path).num_rows == 2
    partial = {key: value for key, value in solved.items() if key != schema.CORRECT}
    path.write_text(json.dumps(solved) + "\n" + json.dumps({**partial, schema.TRAJECTORY_ID: "p1/9"}) + "\n")
    assert read_trajectories(path).num_rows == 2


def test_verdicts_that_arrow_types_as_nulls_are_read_as_no_verdicts(tmp_path):
    rows = [{**{key: value for key, value in row.items() if key != schema.CORRECT}, schema.T_STAR: None} for row in _episode_rows()]
    table = pa.Table.from_pylist(rows).append_column(schema.CORRECT, pa.array([[None, None], [None] * 3], pa.list_(pa.null())))
    pq.write_table(table, tmp_path / "nulls.parquet")
    assert read_trajectories(tmp_path / "nulls.parquet").num_rows == 2


def test_turns_must_be_the_conversation_s_replies(tmp_path):
    # One reward per assistant message: a return over turns the conversation lacks would weigh it.
    rows = _episode_rows()
    # Its last reply and the feedback before it gone: the rewards, not the per-turn flags that match them
    # (correct, format_failures, cut_off), are what disagrees with the conversation.
    rows[1] = {**rows[1], schema.MESSAGES: rows[1][schema.MESSAGES][:-2]}
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "short.parquet")
    write_jsonl(tmp_path / "short.jsonl", rows)
    problem = "field 'messages': turn_rewards has 3 values for 2 assistant messages; expected one each"
    with pytest.raises(TrajectoryFileError, match=re.escape(f"short.parquet: row 2: {problem}")):
        read_trajectories(tmp_path / "short.parquet")
    with pytest.raises(TrajectoryFileError, match=re.escape(f"short.jsonl:2: {problem}")):
        read_trajectories(tmp_path / "short.jsonl")
    # A misspelt role, which is why a reply goes uncounted, is named.
    rows = _episode_rows()
    typo_messages = [{**message, "role": "assistent"} if i == 1 else message for i, message in enumerate(rows[0][schema.MESSAGES])]
    rows[0] = {**rows[0], schema.MESSAGES: typo_messages}
    write_jsonl(tmp_path / "typo.jsonl", rows)
    typo = (
        "turn_rewards has 2 values for 1 assistant message; expected one each (roles other than system, user and "
        "assistant: message 2's 'assistent')"
    )
    with pytest.raises(TrajectoryFileError, match=re.escape(f"typo.jsonl:1: field 'messages': {typo}")):
        read_trajectories(tmp_path / "typo.jsonl")
    line = json.loads(AUTHORS_SAMPLE.read_text().splitlines()[0])
    line["turn_rewards"] = {"t1": 0.0, "t2": 1.0, "t3": 0.0}
    line.pop("verifier"), line.pop("reward_details"), line.pop("t_star")
    (tmp_path / "authors.jsonl").write_text(json.dumps(line) + "\n")
    # The authors' scripts pad rewards to their max_turns with zeros; a reward for a turn not played is refused.
    with pytest.raises(
        TrajectoryFileError,
        match=r"authors\.jsonl:1: field 'turn_rewards\.t2': expected 0, as turn 2 was not played \(1 turn\(s\) in the line\), found 1\.0",
    ):
        read_trajectories(tmp_path / "authors.jsonl")


def test_a_trajectory_id_on_two_rows_names_both_across_shards(tmp_path):
    rows = _episode_rows()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1:]), tmp_path / "part-b.parquet")
    expected = r"part-b\.parquet: row 1: trajectory_id 'p1/1' is also that of .*part-a\.parquet: row 2; weighted SFT"
    with pytest.raises(TrajectoryFileError, match=expected):
        read_trajectories(tmp_path)


def test_what_pandas_writes_is_read_a_t_star_of_floats_beside_nulls_and_category_ids(tmp_path):
    rows = _episode_rows()
    assert [r[schema.T_STAR] for r in rows] == [2, None]
    table = pa.Table.from_pylist(rows)
    t_star = table.schema.get_field_index(schema.T_STAR)
    pq.write_table(table.set_column(t_star, schema.T_STAR, pa.array([2.0, None])), tmp_path / "floats.parquet")
    assert read_trajectories(tmp_path / "floats.parquet").column(schema.T_STAR).to_pylist() == [2.0, None]
    jsonl = tmp_path / "floats.jsonl"
    jsonl.write_text("".join(json.dumps({**r, schema.T_STAR: r[schema.T_STAR] and 2.0}) + "\n" for r in rows))
    assert read_trajectories(jsonl).column(schema.T_STAR).to_pylist() == [2, None]
    pq.write_table(table.set_column(t_star, schema.T_STAR, pa.array([1.5, None])), tmp_path / "half.parquet")
    with pytest.raises(TrajectoryFileError, match=r"half\.parquet: row 1: field 't_star': .* found 1\.5"):
        read_trajectories(tmp_path / "half.parquet")
    # A column that pandas writes without a single value has Arrow's null type.
    correct = table.schema.get_field_index(schema.CORRECT)
    pq.write_table(table.set_column(correct, schema.CORRECT, pa.nulls(2)), tmp_path / "no_verdicts.parquet")
    no_verdicts = read_trajectories(tmp_path / "no_verdicts.parquet").column(schema.CORRECT)
    assert no_verdicts.type == pa.list_(pa.bool_()) and no_verdicts.to_pylist() == [None, None]
    ids = table.schema.get_field_index(schema.TRAJECTORY_ID)
    categories = table.set_column(ids, schema.TRAJECTORY_ID, table.column(ids).dictionary_encode())
    pq.write_table(categories, tmp_path / "categories.parquet")
    assert read_trajectories(tmp_path / "categories.parquet").column(schema.TRAJECTORY_ID).to_pylist() == ["p1/0", "p1/1"]
    pq.write_table(table.set_column(ids, schema.TRAJECTORY_ID, pa.array([[1], [2]])), tmp_path / "lists.parquet")
    with pytest.raises(TrajectoryFileError, match=r"lists\.parquet: field 'trajectory_id': expected a column of text or integers"):
        read_trajectories(tmp_path / "lists.parquet")


def test_parquet_with_wrong_column_type_or_missing_column(tmp_path):
    rows = _episode_rows()
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, schema.TURN_REWARDS: "1.0"} for r in rows]), path)
    expected = rf"bad\.parquet: field '{schema.TURN_REWARDS}': expected .*found type string"
    with pytest.raises(TrajectoryFileError, match=expected):
        read_trajectories(path)
    for field in (schema.CORRECT, schema.FORMAT_FAILURES):  # verdicts the weights read as booleans
        words = [["yes" if flag else "no" for flag in r[field]] for r in rows]
        pq.write_table(pa.Table.from_pylist(rows).set_column(list(rows[0]).index(field), field, pa.array(words)), path)
        with pytest.raises(TrajectoryFileError, match=rf"bad\.parquet: field '{field}': .*lists of booleans, found type list<\w+: string>"):
            read_trajectories(path)
    pq.write_table(pa.Table.from_pylist(rows).drop_columns([schema.ANSWER_NORMS]), path)
    with pytest.raises(schema.MissingColumnsError, match=schema.ANSWER_NORMS):
        read_trajectories(path)


def test_parquet_text_that_is_not_utf8_names_its_shard(tmp_path):
    table = pa.Table.from_pylist(_episode_rows())
    gold = table.schema.get_field_index(schema.GOLD)
    # Parquet's reader does not check text: such bytes would fail when the row is read, in training.
    latin1 = pa.Array.from_buffers(pa.string(), 2, pa.array(["7", "caf\u00e9".encode("latin-1")], pa.binary()).buffers())
    pq.write_table(table.slice(0, 1), tmp_path / "part-a.parquet")
    pq.write_table(table.set_column(gold, schema.GOLD, latin1), tmp_path / "part-b.parquet")
    with pytest.raises(TrajectoryFileError, match=r"part-b\.parquet: not UTF-8 text"):
        read_trajectories(tmp_path)


def test_parquet_integer_rewards_are_read_as_float(tmp_path):
    rows = [{**r, schema.TURN_REWARDS: [int(x) for x in r[schema.TURN_REWARDS]]} for r in _episode_rows()]
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    table = read_trajectories(path)
    assert table.schema.field(schema.TURN_REWARDS).type == pa.list_(pa.float64())
    assert table.column(schema.TURN_REWARDS).to_pylist() == [r[schema.TURN_REWARDS] for r in rows]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(TrajectoryFileError, match="no such file"):
        read_trajectories(tmp_path / "absent.jsonl")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    with pytest.raises(TrajectoryFileError, match=r"blank\.jsonl: no trajectories"):
        read_trajectories(blank)


def test_require_parquet_names_what_is_missing_or_not_parquet(tmp_path):
    hint = "run drift-ray weights first"
    with pytest.raises(TrajectoryFileError, match=r"absent\.parquet: no such file or directory; run drift-ray"):
        require_parquet(tmp_path / "absent.parquet", hint)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrajectoryFileError, match=r"empty: no \*\.parquet file in the directory"):
        require_parquet(empty, hint)
    with pytest.raises(TrajectoryFileError, match=r"authors_sample\.jsonl: not a Parquet file; run drift-ray"):
        require_parquet(AUTHORS_SAMPLE, hint)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_table_atomic(pa.table({"x": [1]}), shards / "part-0.parquet")
    (shards / "notes.jsonl").write_text("{}\n")  # weighted SFT reads the Parquet files alone: beside them, not refused
    require_parquet(shards, hint)
    require_parquet(shards / "part-0.parquet", hint)
    (shards / "part-1.parquet").write_text("{}\n")  # a shard that only says it is Parquet
    with pytest.raises(TrajectoryFileError, match=r"part-1\.parquet: not a Parquet file"):
        require_parquet(shards, hint)


def test_require_same_settings_names_each_changed_setting_by_its_dotted_path(tmp_path):
    record = tmp_path / "settings.json"
    settings = {"weights": {"beta": 0.1, "mode": "drift"}, "shards": ["a", "b"], "seed": None}
    require_same_settings(record, settings, output="out")  # nothing recorded: an output of an older version
    write_json_atomic(settings, record)
    require_same_settings(record, {**settings, "shards": ("a", "b")}, output="out")  # compared as stored
    # A setting the record lacks was added by a later version: not compared.
    require_same_settings(record, {**settings, "weights": {"beta": 0.1, "mode": "drift", "new": 1}}, output="out")
    # Ignored settings, and those under them, may differ or be gone.
    require_same_settings(record, {"shards": ["a", "b"], "seed": None}, output="out", ignore=["weights"])
    require_same_settings(record, {**settings, "weights": {"mode": "drift"}}, output="out", ignore=["weights.beta"])
    changed = {"weights": {"beta": 0.5, "mode": "drift"}, "shards": ["a", "b", "c"], "lr": 1.0}
    with pytest.raises(RuntimeError, match=r"differ in: seed \(None then, unset now\)\)"):
        require_same_settings(record, changed, output="out", ignore=["weights", "shards"])
    with pytest.raises(RuntimeError) as refused:
        require_same_settings(record, changed, output="run/weighted")
    assert str(refused.value) == (
        "run/weighted: made with other settings (differ in: seed (None then, unset now); "
        "shards (['a', 'b'] then, ['a', 'b', 'c'] now); weights.beta (0.1 then, 0.5 now)), "
        f"recorded in {record}. Rerun with the same config, or use a new run_dir."
    )
    # Where only what it was made from differs, the same config cannot make it again.
    with pytest.raises(RuntimeError, match=r"Rerun with the same config"):
        require_same_settings(record, changed, output="run/weighted", inputs=["shards"])
    with pytest.raises(RuntimeError) as refused:
        require_same_settings(record, changed, output="run/weighted", ignore=["seed", "weights"], inputs=["shards"])
    assert str(refused.value).endswith(
        f"recorded in {record}. What it was made from changed since: remove run/weighted to make it again, "
        "or use a new run_dir."
    )
    # Options that follow from a verifier are not named where the verifier changed: the user changed only that.
    write_json_atomic({"verifier": "numeric", "verifier_options": {"rel_tol": None, "abs_tol": None}}, record)
    follows = {"verifier_options": "verifier"}
    with pytest.raises(RuntimeError, match=r"\(differ in: verifier \('numeric' then, 'exact' now\)\), recorded"):
        require_same_settings(record, {"verifier": "exact", "verifier_options": {}}, output="out", follows=follows)
    with pytest.raises(RuntimeError, match=r"\(differ in: verifier_options.rel_tol \(None then, 0.1 now\)\), recorded"):
        tolerant = {"verifier": "numeric", "verifier_options": {"rel_tol": 0.1, "abs_tol": None}}
        require_same_settings(record, tolerant, output="out", follows=follows)
    with pytest.raises(TypeError, match=r"ignore takes a collection of dotted paths, not 'weights'"):
        require_same_settings(record, changed, output="out", ignore="weights")
    with pytest.raises(TypeError, match=r"only takes a collection"):
        require_same_settings(record, changed, output="out", only="seed")


@pytest.mark.parametrize(
    "content, problem",
    [
        (b'{"weights": {"be', r"not valid JSON \(Unterminated string starting at: line 1 column 14 \(char 13\)\)"),
        (b"", "empty"),
        (b'["weights", 0.1]\n', "holds a JSON array, not an object"),
        (b'{"weights": "\xff"}', r"not UTF-8 text \(invalid start byte at byte 13\)"),
    ],
)
def test_a_damaged_settings_record_is_named_with_what_is_wrong_and_a_remedy(tmp_path, content, problem):
    # A record cut short (a full disk, a killed copy): the error named no file ("Expecting value: line 1 ..."),
    # and a record that is no object failed inside the comparison.
    output = tmp_path / "weighted"
    record = output / "settings.json"
    output.mkdir()
    record.write_bytes(content)
    with pytest.raises(ValueError) as refused:
        require_same_settings(record, {"weights": {"beta": 0.1}}, output=str(output))
    assert re.fullmatch(
        rf"{re.escape(str(record))}: {problem}; it records what made {re.escape(str(output))}: remove "
        rf"{re.escape(str(output))} to make it again, or use a new run_dir",
        str(refused.value),
    )


def test_a_setting_known_by_another_is_compared_unless_both_sides_hold_that(tmp_path):
    record = tmp_path / "manifest.json"
    known_by = {"model": "model_fingerprint"}
    write_json_atomic({"model": "runs/a/model", "model_fingerprint": "f1"}, record)
    # The same files at another path: the same model.
    require_same_settings(record, {"model": "runs/b/model", "model_fingerprint": "f1"}, output="out", known_by=known_by)
    # Other files at another path: another model in the config, named beside its fingerprint.
    with pytest.raises(RuntimeError) as refused:
        require_same_settings(record, {"model": "runs/b/model", "model_fingerprint": "f2"}, output="out",
                              known_by=known_by, inputs=["model_fingerprint"])
    assert "differ in: model ('runs/a/model' then, 'runs/b/model' now); model_fingerprint ('f1' then, 'f2' now))" in str(
        refused.value
    ) and str(refused.value).endswith("Rerun with the same config, or use a new run_dir.")
    # Other files at the same path (a model retrained there): only what it was made from changed.
    with pytest.raises(RuntimeError) as refused:
        require_same_settings(record, {"model": "runs/a/model", "model_fingerprint": "f2"}, output="out",
                              known_by=known_by, inputs=["model_fingerprint"])
    assert "differ in: model_fingerprint ('f1' then, 'f2' now))" in str(refused.value)
    assert str(refused.value).endswith("What it was made from changed since: remove out to make it again, or use a new run_dir.")
    # Hub ids have no fingerprint, and a record from before fingerprints lacks it: the names are compared.
    for recorded, current in (({"model": "Qwen/A", "model_fingerprint": None}, {"model": "Qwen/B", "model_fingerprint": None}),
                              ({"model": "runs/a/model"}, {"model": "runs/b/model", "model_fingerprint": "f1"})):
        write_json_atomic(recorded, record)
        with pytest.raises(RuntimeError, match=r"differ in: model \("):
            require_same_settings(record, current, output="out", known_by=known_by)


def test_a_column_that_changes_type_names_its_line(tmp_path):
    rows = _episode_rows()
    rows[1][schema.NUM_TURNS] = "three"
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(TrajectoryFileError, match=rf"data\.jsonl:2: field '{schema.NUM_TURNS}'.*'three'"):
        read_trajectories(path)

def test_a_field_drift_ray_does_not_read_is_kept_as_json_text_where_arrow_cannot_hold_it(tmp_path, caplog):
    # Values of two types, a list of two, an integer beyond 64 bits: kept as written, not refused.
    rows = _episode_rows()
    tags = [[1, "x"], 2**64]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({**row, "tags": tag}) + "\n" for row, tag in zip(rows, tags)))
    with caplog.at_level(logging.WARNING, logger="drift_ray"):
        table = read_trajectories(path)
    assert [json.loads(text) for text in table.column("tags").to_pylist()] == tags
    assert "data.jsonl: field 'tags' holds values of more than one type" in caplog.text
    # Values of one type stay of it.
    path.write_text("".join(json.dumps({**row, "tags": ["a", "b"]}) + "\n" for row in rows))
    assert read_trajectories(path).column("tags").to_pylist() == [["a", "b"]] * 2


def test_a_field_holding_empty_objects_is_kept_as_json_text_that_parquet_can_hold(tmp_path, caplog):
    """Before, the weights file could not be written: Parquet holds no object without fields."""
    rows = _episode_rows()
    extras = [{"extra_info": {}, "meta": {"info": {}, "a": 1}}, {"extra_info": {}, "meta": {"info": {}, "a": 2}}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({**row, **extra}) + "\n" for row, extra in zip(rows, extras)))
    with caplog.at_level(logging.WARNING, logger="drift_ray"):
        table = read_trajectories(path)
    assert [json.loads(text) for text in table.column("meta").to_pylist()] == [extra["meta"] for extra in extras]
    assert table.column("extra_info").to_pylist() == ["{}", "{}"]
    assert "field 'extra_info' holds values of more than one type, integers beyond 64 bits or empty objects" in caplog.text
    write_table_atomic(table, tmp_path / "out.parquet")
    assert pq.read_table(tmp_path / "out.parquet").column("meta").to_pylist() == table.column("meta").to_pylist()


@pytest.mark.parametrize("field", [schema.MESSAGES, "note"])
def test_half_a_surrogate_pair_is_named_by_its_line_and_field(tmp_path, field):
    """Before, the error named no line: "'utf-8' codec can't encode character '\\ud83d'"."""
    rows = _episode_rows()
    cut = "an emoji cut in two: \ud83d"  # written as JSON's escape of half a pair, which is no Unicode character
    if field == schema.MESSAGES:
        rows[1][schema.MESSAGES][0]["content"] += cut
    else:
        rows[0]["note"], rows[1]["note"] = "fine", cut
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    assert "\\ud83d" in path.read_text()
    with pytest.raises(TrajectoryFileError, match=rf"data\.jsonl:2: field '{field}': expected text of Unicode characters, found half a surrogate pair"):
        read_trajectories(path)


def test_a_field_named_with_half_a_surrogate_pair_is_refused_with_its_line(tmp_path):
    rows = _episode_rows()
    rows[1]["note \ud83d"] = 1
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(TrajectoryFileError, match=r"data\.jsonl:2: a field named with half a surrogate pair, '\\ud83d'$"):
        read_trajectories(path)


def test_text_where_a_list_is_read_is_refused_not_split_into_characters(tmp_path):
    rows = _episode_rows()
    rows[1][schema.CUT_OFF] = "no"
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(TrajectoryFileError, match=rf"data\.jsonl:2: field '{schema.CUT_OFF}': expected a list \(a value of type"):
        read_trajectories(path)


def test_message_keys_besides_role_and_content_are_warned_of(tmp_path, caplog):
    rows = _episode_rows()
    rows[1][schema.MESSAGES][0]["name"] = "bob"
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="drift_ray"):
        table = read_trajectories(path)
    assert "data.jsonl:2: message 1 has keys ['name'] besides role and content" in caplog.text
    assert set(table.column(schema.MESSAGES).to_pylist()[1][0]) == {"role", "content"}


def test_a_gzip_compressed_file_reads_as_its_text_and_utf16_is_named(tmp_path):
    import gzip

    text = AUTHORS_SAMPLE.read_text()
    compressed = tmp_path / "sample.jsonl.gz"
    compressed.write_bytes(gzip.compress(text.encode()))
    assert read_trajectories(compressed).equals(read_trajectories(AUTHORS_SAMPLE))
    utf16 = tmp_path / "sample.jsonl"
    utf16.write_bytes(text.encode("utf-16"))
    with pytest.raises(TrajectoryFileError, match=r"sample\.jsonl: UTF-16 text; save it as UTF-8"):
        read_trajectories(utf16)
    cut = tmp_path / "cut.jsonl.gz"  # a download or copy that stopped short
    cut.write_bytes(compressed.read_bytes()[:-20])
    with pytest.raises(TrajectoryFileError, match=r"cut\.jsonl\.gz: a damaged gzip file, read up to line \d+ \(Compressed file ended"):
        read_trajectories(cut)
    shards = tmp_path / "shards"  # read as Parquet alone, a compressed JSONL among them would be left out
    shards.mkdir()
    write_table_atomic(read_trajectories(AUTHORS_SAMPLE), shards / "part-0.parquet")
    compressed.rename(shards / "more.jsonl.gz")
    with pytest.raises(TrajectoryFileError, match=r"more\.jsonl\.gz: a directory of trajectories is read as Parquet files alone"):
        read_trajectories(shards)


def test_an_integer_gold_reads_as_text(tmp_path):
    rows = _episode_rows()
    for row in rows:
        row[schema.GOLD] = 7
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    assert read_trajectories(path).column(schema.GOLD).to_pylist() == ["7", "7"]


def test_the_shards_of_a_directory_keep_their_own_columns_or_are_named(tmp_path):
    rows = _episode_rows()
    pq.write_table(pa.Table.from_pylist(rows[:1]).drop_columns([schema.CORRECT]), tmp_path / "part-a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1:]), tmp_path / "part-b.parquet")
    differ = rf"part-b\.parquet: its columns differ from those of .*part-a\.parquet .*\(in: {schema.CORRECT}\)"
    with pytest.raises(TrajectoryFileError, match=differ):
        read_trajectories(tmp_path)
    # An integer penalty in one shard and a fractional one in another: one float column.
    pq.write_table(pa.Table.from_pylist([{**rows[0], schema.FORMAT_PENALTY: 0}]), tmp_path / "part-a.parquet")
    pq.write_table(pa.Table.from_pylist([{**rows[1], schema.FORMAT_PENALTY: -0.5}]), tmp_path / "part-b.parquet")
    assert read_trajectories(tmp_path).column(schema.FORMAT_PENALTY).to_pylist() == [0.0, -0.5]


def test_rollouts_played_before_cut_offs_were_recorded_read_beside_later_ones_as_not_known(tmp_path):
    rows = _episode_rows()
    pq.write_table(pa.Table.from_pylist(rows[:1]).drop_columns([schema.CUT_OFF]), tmp_path / "part-a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1:]), tmp_path / "part-b.parquet")
    assert read_trajectories(tmp_path).column(schema.CUT_OFF).to_pylist() == [None, [False] * 3]
    # Another column's type differs: the file that differs is named, not the one without the flags.
    pq.write_table(pa.Table.from_pylist(rows[:1]).drop_columns([schema.CUT_OFF]), tmp_path / "part-a.parquet")
    retyped = pa.Table.from_pylist([{**rows[1], schema.PROMPT_TOKENS: "many"}])
    pq.write_table(retyped, tmp_path / "part-c.parquet")
    with pytest.raises(TrajectoryFileError, match=r"part-c\.parquet: its column types differ from those of .*part-a"):
        read_trajectories(tmp_path)
    (tmp_path / "part-c.parquet").unlink()
    # Not of the same turns, or not booleans: named.
    path = tmp_path / "data.jsonl"
    for value, expected in (([True], "a list of one value per turn"), ([1, 0, 0], "true or false for each turn")):
        path.write_text(json.dumps({**rows[1], schema.CUT_OFF: value}) + "\n")
        with pytest.raises(TrajectoryFileError, match=rf"data\.jsonl:1: field '{schema.CUT_OFF}': expected {expected}"):
            read_trajectories(path)


def test_parquet_answers_that_are_all_empty_lists_read_as_no_answers(tmp_path):
    rows = [{**row, schema.ANSWER_NORMS: []} for row in _episode_rows()]
    table = pa.Table.from_pylist(rows)
    assert table.schema.field(schema.ANSWER_NORMS).type == pa.list_(pa.null())  # as Arrow infers it
    pq.write_table(table, tmp_path / "none.parquet")
    read = read_trajectories(tmp_path / "none.parquet")
    assert read.column(schema.ANSWER_NORMS).type == pa.list_(pa.string())
    assert read.column(schema.ANSWER_NORMS).to_pylist() == [[], []]


def test_write_table_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out" / "t.parquet"
    first = pa.table({"x": [1, 2]})
    write_table_atomic(first, path)
    write_table_atomic(pa.table({"x": [3]}), path)
    assert pq.read_table(path).to_pydict() == {"x": [3]}
    assert [p.name for p in path.parent.iterdir()] == ["t.parquet"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    write_table_atomic(pa.table({"x": [1]}), path)

    def crash_midway(table, where):
        where.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        write_table_atomic(pa.table({"x": [2]}), path)
    monkeypatch.undo()
    assert pq.read_table(path).to_pydict() == {"x": [1]}
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_write_json_atomic(tmp_path):
    path = tmp_path / "d.json"
    write_json_atomic({"b": 1, "a": [0.5]}, path)
    assert json.loads(path.read_text()) == {"a": [0.5], "b": 1}
    with pytest.raises(ValueError):
        write_json_atomic({"a": float("nan")}, path)
    assert json.loads(path.read_text()) == {"a": [0.5], "b": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["d.json"]


def record_disk_syncs(monkeypatch) -> list[tuple[str, object]]:
    """Events in order: ("fsync", inode) for every fsync, ("replace", source name) for every rename."""
    events: list[tuple[str, object]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def recording_replace(source, target):
        events.append(("replace", Path(source).name))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return events


def test_publish_directory_puts_every_file_on_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    staging = tmp_path / ".model.staging"
    (staging / "nested").mkdir(parents=True)
    (staging / "weights.bin").write_bytes(b"w" * 1000)
    (staging / "nested" / "config.json").write_text("{}")
    before_rename = {p.stat().st_ino for p in [staging, *staging.rglob("*")]}
    events = record_disk_syncs(monkeypatch)

    publish_directory(staging, tmp_path / "model")

    rename = events.index(("replace", ".model.staging"))
    assert {inode for kind, inode in events[:rename]} == before_rename
    assert events[rename + 1 :] == [("fsync", tmp_path.stat().st_ino)]
    assert not staging.exists()
    assert (tmp_path / "model" / "weights.bin").read_bytes() == b"w" * 1000
    assert (tmp_path / "model" / "nested" / "config.json").read_text() == "{}"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_published_directory_gets_the_modes_of_the_umask_not_the_private_ones_it_was_staged_with(tmp_path, umask):
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    outside.chmod(0o600)
    previous = os.umask(umask)  # the process's all along, as in a run
    try:
        staging = Path(tempfile.mkdtemp(dir=tmp_path))  # mkdtemp: 0700
        safetensors.numpy.save_file({"w": np.zeros(2, dtype=np.float32)}, str(staging / "model.safetensors"))
        (staging / "nested").mkdir(mode=0o700)
        (staging / "nested" / "config.json").write_text("{}")
        (staging / "run.sh").write_text("exit 0\n")
        (staging / "run.sh").chmod(0o700)
        (staging / "link.json").symlink_to(outside)
        publish_directory(staging, tmp_path / "model")
    finally:
        os.umask(previous)

    published = [tmp_path / "model", *(tmp_path / "model").rglob("*")]
    modes = {p.relative_to(tmp_path).as_posix(): p.lstat().st_mode & 0o777 for p in published if not p.is_symlink()}
    assert modes == {
        "model": 0o777 & ~umask,
        "model/model.safetensors": 0o666 & ~umask,
        "model/nested": 0o777 & ~umask,
        "model/nested/config.json": 0o666 & ~umask,
        "model/run.sh": 0o700 | (0o666 & ~umask),  # permissions are added, never taken
    }
    assert outside.stat().st_mode & 0o777 == 0o600  # a link's target is not the tree's to change


def test_a_lock_on_a_file_system_that_takes_none_warns_and_lets_the_work_go_on(tmp_path, monkeypatch, caplog):
    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with exclusive_lock(tmp_path / ".lock", wait=False) as waited:
        assert waited == 0.0 and (tmp_path / ".lock").read_text() == ""  # claims no holder: it holds nothing
    assert f"{tmp_path / '.lock'}: No locks available; nothing keeps another process from writing {tmp_path}" in caplog.text


def test_the_umask_read_without_the_kernels_report_is_the_processs_and_stays_so(tmp_path):
    previous = os.umask(0o027)
    try:
        assert _umask(tmp_path / "no-status-file") == 0o027
        assert _umask() == 0o027
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(previous)


def test_a_held_lock_refuses_another_holder_by_name_and_is_gone_when_its_holder_is_killed(tmp_path):
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from drift_ray.trajectories import exclusive_lock\n"
         "with exclusive_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)", str(lock)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(DirectoryInUseError, match=f"{lock.parent} is in use by pid {holder.pid} on "):
            with exclusive_lock(lock, wait=False):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(lock, wait=False):
        assert lock.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"


def test_an_atomic_write_is_on_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    events = record_disk_syncs(monkeypatch)
    write_json_atomic({"a": 1}, tmp_path / "d.json")
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert events[0][1] == (tmp_path / "d.json").stat().st_ino and events[2][1] == tmp_path.stat().st_ino


def weighted_table(weights: list[float]) -> pa.Table:
    """Weighted SFT input: trajectory p/i has weight weights[i] and one reply, "i"."""
    return pa.table({
        schema.TRAJECTORY_ID: [f"p/{i}" for i in range(len(weights))],
        schema.WEIGHT: weights,
        schema.MESSAGES: [[{"role": "assistant", "content": str(i)}] for i in range(len(weights))],
    })


def written_again(table: pa.Table, directory: Path) -> str:
    """`table` as Ray Data writes it again: other file names, other blocks, other order."""
    directory.mkdir()
    half = table.num_rows // 2
    pq.write_table(table.slice(half), directory / "7f3a_000000.parquet")
    pq.write_table(table.slice(0, half), directory / "7f3a_000001.parquet")
    return str(directory)


def test_a_conversations_fingerprint_follows_the_ids_and_messages_not_the_files_or_weights(tmp_path):
    table = weighted_table([1.0] * 4)
    pq.write_table(table, tmp_path / "one.parquet")
    first = conversations_fingerprint(str(tmp_path / "one.parquet"))
    assert conversations_fingerprint(written_again(table, tmp_path / "again")) == first
    pq.write_table(table.set_column(1, schema.WEIGHT, pa.array([2.0] * 4)), tmp_path / "reweighted.parquet")
    assert conversations_fingerprint(str(tmp_path / "reweighted.parquet")) == first
    other = [[{"role": "assistant", "content": "x" if i == 3 else str(i)}] for i in range(4)]
    pq.write_table(table.set_column(2, schema.MESSAGES, pa.array(other)), tmp_path / "other-rollouts.parquet")
    assert conversations_fingerprint(str(tmp_path / "other-rollouts.parquet")) not in {None, first}
    assert conversations_fingerprint("s3://bucket/weighted") is None
    assert conversations_fingerprint(str(tmp_path / "missing.parquet")) is None
    # Trained otherwise: a reply cut off. No reply cut off is what rows without the flags were.
    flags = pa.array([[False], [False], [None], [False]], pa.list_(pa.bool_()))
    pq.write_table(table.append_column(schema.CUT_OFF, flags), tmp_path / "none-cut.parquet")
    assert conversations_fingerprint(str(tmp_path / "none-cut.parquet")) == first
    flags = pa.array([[False], [True], [None], [False]], pa.list_(pa.bool_()))
    pq.write_table(table.append_column(schema.CUT_OFF, flags), tmp_path / "one-cut.parquet")
    one_cut = conversations_fingerprint(str(tmp_path / "one-cut.parquet"))
    assert one_cut not in {None, first}
    # A flag not known is trained as not cut off.
    flags = pa.array([[False], [True], [False], [None]], pa.list_(pa.bool_()))
    pq.write_table(table.append_column(schema.CUT_OFF, flags), tmp_path / "one-cut-again.parquet")
    assert conversations_fingerprint(str(tmp_path / "one-cut-again.parquet")) == one_cut


def test_a_weighted_fingerprint_follows_the_ids_and_weights_not_the_files(tmp_path):
    table = weighted_table([0.5, 1.5, 1.0, 2.0, 0.25, 0.75])
    pq.write_table(table, tmp_path / "one.parquet")
    first = weighted_fingerprint(str(tmp_path / "one.parquet"))
    assert weighted_fingerprint(written_again(table, tmp_path / "again")) == first
    weights = table[schema.WEIGHT].to_pylist()
    summed_otherwise = table.set_column(1, schema.WEIGHT, pa.array([weights[0] * (1 + 1e-15), *weights[1:]]))
    pq.write_table(summed_otherwise, tmp_path / "last-bit.parquet")
    assert weighted_fingerprint(str(tmp_path / "last-bit.parquet")) == first
    reweighted = table.set_column(1, schema.WEIGHT, pa.array([weights[0] + 1e-3, *weights[1:]]))
    pq.write_table(reweighted, tmp_path / "other-beta.parquet")
    assert weighted_fingerprint(str(tmp_path / "other-beta.parquet")) != first
    assert weighted_fingerprint("s3://bucket/weighted") is None
    assert weighted_fingerprint(str(tmp_path / "missing.parquet")) is None
    pq.write_table(table.set_column(1, schema.WEIGHT, pa.array(["1"] * 6)), tmp_path / "strings.parquet")
    assert weighted_fingerprint(str(tmp_path / "strings.parquet")) is None  # for the training's check to name
    null_weight = table.set_column(1, schema.WEIGHT, pa.array([None, *weights[1:]], pa.float64()))
    pq.write_table(null_weight, tmp_path / "null.parquet")
    assert weighted_fingerprint(str(tmp_path / "null.parquet")) not in {None, first}  # for that check to name too


def _authors_line(turns: list[tuple[str, float, int]], max_turns: int, **fields) -> dict:
    """A line as the authors' scripts write it: per-turn mappings padded with zeros up to `max_turns`, and
    the details and messages of the turns played. `turns`: (reply, reward, verdict) per turn played."""
    messages = [{"role": "user", "content": "What is 3 * 4?"}]
    for k, (reply, _, _) in enumerate(turns):
        messages += [{"role": "assistant", "content": reply}]
        if k < len(turns) - 1:
            messages += [{"role": "user", "content": "Incorrect. Please think again."}]
    played = {f"t{t}": (reward, verdict) for t, (_, reward, verdict) in enumerate(turns, 1)}
    return {
        "prompt_id": "q_0",
        "messages": messages,
        "verifier": {f"t{t}": played.get(f"t{t}", (0.0, 0))[1] for t in range(1, max_turns + 1)},
        "turn_rewards": {f"t{t}": played.get(f"t{t}", (0.0, 0))[0] for t in range(1, max_turns + 1)},
        "t_star": next((t for t, (_, _, verdict) in enumerate(turns, 1) if verdict), None),
        **fields,
    }


def test_the_authors_lines_are_read_as_their_scripts_write_them(tmp_path):
    """Both of their generators pad rewards and verdicts to max_turns; the math one writes no format
    penalty (its rewards pay for format instead) and per-turn details without one."""
    metamath = [
        _authors_line(
            [("<answer>12</answer>", 1.0, 1)], 5, gold="12", answer_norms=["12"], format_penalty=0.0,
            reward_details={"t1": {"env_reward": 1.0, "format_penalty": 0.0, "actions": ["12"], "info": {}}},
        ),
        _authors_line(
            [("7", 0.0, 0), ("<answer>12</answer>", 1.0, 1)], 5, gold="12", answer_norms=["12"], format_penalty=-0.1,
            reward_details={
                "t1": {"env_reward": 0.0, "format_penalty": -0.1, "actions": [], "info": {}},
                "t2": {"env_reward": 1.0, "format_penalty": 0.0, "actions": ["12"], "info": {}},
            },
        ),
    ]
    components = {"correctness": 0.0, "strict_format": 0.0, "loose_format": 0.2, "xml": 0.5, "repeat_penalty": 0.0}
    math = [
        _authors_line(
            [("<answer>7</answer>", 0.7, 0), ("<answer>12</answer>", 3.2, 1)], 2, answer_norms=["7", "12"],
            reward_details={"t1": components, "t2": {**components, "correctness": 2.0}},
        ),
        _authors_line(
            [("<answer>12</answer>", 3.2, 1)], 2, answer_norms=["12"],
            reward_details={"t1": {**components, "correctness": 2.0}},
        ),
    ]
    path = tmp_path / "authors.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in metamath + math))

    table = read_trajectories(path)

    assert table.column(schema.TURN_REWARDS).to_pylist() == [[1.0], [0.0, 1.0], [0.7, 3.2], [3.2]]
    assert table.column(schema.CORRECT).to_pylist() == [[True], [False, True], [False, True], [True]]
    assert table.column(schema.FORMAT_PENALTY).to_pylist() == [0.0, -0.1, 0.0, 0.0]  # none written: none, as theirs
    assert table.column(schema.FORMAT_FAILURES).to_pylist() == [[False], [True, False], None, None]
    assert table.column(schema.TRAJECTORY_ID).to_pylist() == ["q_0/0", "q_0/1", "q_0/2", "q_0/3"]
