"""The rollout stage: shards, resume and manifests without Ray; the Ray Data actor pool on a local cluster."""

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_ray import schema
from drift_ray.config import EpisodeConfig, TaskConfig, load_config
from drift_ray.episode import first_messages
from drift_ray.prompts import Problem
from drift_ray.rollouts import (
    MANIFEST,
    MANIFEST_BEFORE,
    SHARD_GLOB,
    SUMMARY_SCHEMA,
    check_manifest,
    completed_prompts,
    read_shards,
    record_manifest,
    rollout_sampling,
    rollouts_fingerprint,
    rollouts_lock_file,
    run_episodes,
    shard_path,
    summarize,
    trained_by,
)
from drift_ray.trajectories import TRAIN_SETTINGS_FILE, exclusive_lock, files_fingerprint, write_json_atomic
from drift_ray.verifiers import get_verifier


EPISODE = EpisodeConfig()


def problem(prompt_id: str) -> Problem:
    return Problem(prompt_id, f"question {prompt_id}", f"gold {prompt_id}")


def trajectory_rows(prompt_id: str, k: int) -> list[dict]:
    played = problem(prompt_id)
    messages = [*first_messages(played.question, EPISODE), {"role": "assistant", "content": "<answer>1</answer>"}]
    return [
        {schema.PROMPT_ID: prompt_id, schema.TRAJECTORY_ID: f"{prompt_id}/{i}", schema.SAMPLE_INDEX: i,
         schema.GOLD: played.gold, schema.MESSAGES: messages,
         schema.T_STAR: 1 if i == 0 else None, schema.PROMPT_TOKENS: 3, schema.COMPLETION_TOKENS: 5}
        for i in range(k)
    ]


def write_shard(out_dir: Path, prompt_ids: list[str], k: int) -> None:
    rows = [r for pid in prompt_ids for r in trajectory_rows(pid, k)]
    table = pa.Table.from_pylist(rows, schema=schema.TRAJECTORY_SCHEMA)  # the columns left out are null
    pq.write_table(table, shard_path(out_dir, [problem(p) for p in prompt_ids]))


def episode_kwargs(model: str = "some/hub-model") -> dict:
    """run_episodes' arguments besides the problems and their directory: the default config, K = 2."""
    cfg = load_config(None, [])
    return dict(model=model, cfg=cfg, verifier="exact", verifier_options={}, params=rollout_sampling(cfg),
                samples_per_prompt=2, prompts_per_batch=2, num_actors=1)


def test_shard_names_depend_only_on_the_batch(tmp_path):
    a = [Problem("p1", "q", "1"), Problem("p2", "q", "2")]
    # By the prompt ids alone: a rerun finds the batch's shard whatever the problems' text.
    assert shard_path(tmp_path, a) == shard_path(tmp_path, [Problem("p1", "other", "7"), Problem("p2", "q", "8")])
    assert shard_path(tmp_path, a) != shard_path(tmp_path, a[:1])
    assert shard_path(tmp_path, a).parent == tmp_path and shard_path(tmp_path, a).match(SHARD_GLOB)


def test_rollouts_fingerprint_follows_the_shards_of_the_prompts(tmp_path):
    rollouts = tmp_path / "rollouts"
    rollouts.mkdir()
    write_shard(rollouts, ["a", "b"], k=2)
    first = rollouts_fingerprint(rollouts, ["a", "b"])
    write_shard(rollouts, ["c"], k=2)  # another run's prompts in a shared rollout.output_dir
    assert rollouts_fingerprint(rollouts, ["b", "a"]) == first
    assert rollouts_fingerprint(rollouts, ["a", "b", "c"]) != first
    shutil.copytree(rollouts, tmp_path / "moved")
    assert rollouts_fingerprint(tmp_path / "moved", ["a", "b"]) == first  # by content, not by path
    # The batch played again, with other episodes: other rollouts under the same settings.
    shard = shard_path(rollouts, [problem("a"), problem("b")])
    table = pq.read_table(shard)
    pq.write_table(table.set_column(table.schema.get_field_index(schema.T_STAR), schema.T_STAR, pa.nulls(4, pa.int64())), shard)
    assert rollouts_fingerprint(rollouts, ["a", "b"]) != first


def test_completed_prompts_ignores_temporary_files_and_rejects_partial_groups(tmp_path):
    write_shard(tmp_path, ["a", "b"], k=2)
    (tmp_path / ".part-0000.parquet.1234.tmp").write_bytes(b"PAR1 half written")
    asked = [problem("a"), problem("b"), problem("c")]
    assert completed_prompts(tmp_path, asked, 2, EPISODE) == {"a", "b"}
    assert completed_prompts(tmp_path, asked[1:], 2, EPISODE) == {"b"}  # other runs' prompts may share the directory
    with pytest.raises(RuntimeError, match="expected 3"):
        completed_prompts(tmp_path, asked, 3, EPISODE)
    # A prompt in two shards (one copied in from another run's directory): both are named.
    write_shard(tmp_path, ["b", "c"], k=2)
    both = sorted(shard.name for shard in tmp_path.glob(SHARD_GLOB))
    with pytest.raises(RuntimeError) as refused:
        completed_prompts(tmp_path, asked, 2, EPISODE)
    assert str(refused.value) == (
        f"{tmp_path}: prompt 'b' has 4 trajectories, expected 2 (rollout.samples_per_prompt), in {', '.join(both)} "
        "(1 such prompts); remove the shards that do not belong there (their prompts are played again), or use a "
        "new directory"
    )


@pytest.mark.parametrize(
    "changed, differs",
    [
        (Problem("b", "question b", "another gold"), "gold differs from the task's now; gold 'gold b' then, 'another gold' now"),
        (Problem("b", "another question", "gold b"), "question differs from the task's now"),
        (Problem("b", "another question", "another gold"), "gold and question differ from the task's now; gold 'gold b' then"),
    ],
)
def test_a_prompt_id_now_naming_another_problem_is_not_reused(tmp_path, changed, differs):
    write_shard(tmp_path, ["a", "b"], k=2)
    [shard] = tmp_path.glob("part-*.parquet")
    message = f"{shard}: prompt 'b' was played on another problem (its {differs}"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        completed_prompts(tmp_path, [problem("a"), changed], 2, EPISODE)
    with pytest.raises(RuntimeError, match="its question differs"):  # the instruction is part of the question asked
        completed_prompts(tmp_path, [problem("a")], 2, EpisodeConfig(instruction="Q: {question}"))


def test_read_shards_keeps_the_prompts_asked_for(tmp_path):
    write_shard(tmp_path, ["a", "b"], k=2)
    write_shard(tmp_path, ["c"], k=2)
    assert read_shards(tmp_path).column(schema.PROMPT_ID).to_pylist() == ["a", "a", "b", "b", "c", "c"]
    assert read_shards(tmp_path, prompt_ids={"c", "a", "z"}).column(schema.PROMPT_ID).to_pylist() == ["a", "a", "c", "c"]


def test_a_shard_played_before_cut_offs_were_recorded_reads_as_not_known(tmp_path):
    write_shard(tmp_path, ["a"], k=2)
    [shard] = tmp_path.glob("part-*.parquet")
    pq.write_table(pq.read_table(shard).drop_columns([schema.CUT_OFF]), shard)
    write_shard(tmp_path, ["b"], k=2)
    shard = shard_path(tmp_path, [problem("b")])
    written = pq.read_table(shard)
    flags = pa.array([[False], [True]], pa.list_(pa.bool_()))
    pq.write_table(written.set_column(written.schema.get_field_index(schema.CUT_OFF), schema.CUT_OFF, flags), shard)
    assert completed_prompts(tmp_path, [problem("a"), problem("b")], 2, EPISODE) == {"a", "b"}
    assert read_shards(tmp_path).column(schema.CUT_OFF).to_pylist() == [None, None, [False], [True]]


def test_a_shard_drift_ray_did_not_write_is_refused_by_name(tmp_path):
    write_shard(tmp_path, ["a"], k=2)
    [shard] = tmp_path.glob("part-*.parquet")
    written = pq.read_table(shard)
    pq.write_table(written.drop_columns([schema.CORRECT]), shard)  # read with the schema, it would be all null
    lacks = f"{shard}: the rollouts stage needs column(s) ['correct']; found "
    with pytest.raises(schema.MissingColumnsError, match=re.escape(lacks)):
        read_shards(tmp_path)
    with pytest.raises(schema.MissingColumnsError, match=r"Remove it to have its prompts played again\.$"):
        completed_prompts(tmp_path, [problem("a")], 2, EPISODE)  # before any prompt is played
    retyped = written.set_column(written.schema.get_field_index(schema.GOLD), schema.GOLD, pa.array([b"\xff", b"1"]))
    pq.write_table(retyped, shard)
    with pytest.raises(ValueError, match=re.escape(f"{shard}: cannot be read as trajectories (")):
        read_shards(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{shard}: cannot be read as trajectories (")):
        completed_prompts(tmp_path, [problem("a")], 2, EPISODE)


def test_a_model_retrained_at_the_same_path_is_another_policy(tmp_path):
    model = tmp_path / "model"
    write_json_atomic({"train": {"lr": 0.1}, "seed": 0}, model / TRAIN_SETTINGS_FILE)
    kwargs = episode_kwargs(str(model))
    run_episodes([], tmp_path / "eval", **kwargs)
    write_shard(tmp_path / "eval", ["a"], k=2)  # as if it had played a problem
    run_episodes([], tmp_path / "eval", **kwargs)  # the same model: its episodes are reused
    write_json_atomic({"train": {"lr": 0.2}, "seed": 0}, model / TRAIN_SETTINGS_FILE)
    changed = (
        r"eval: made with other settings \(differ in: model_fingerprint .*; model_trained_by\.train\.lr \(0\.1 then, "
        r"0\.2 now\)\), recorded in .*\. What it was made from changed since: remove .*eval to make it again"
    )
    with pytest.raises(RuntimeError, match=changed):
        run_episodes([], tmp_path / "eval", **kwargs)


def test_other_verifier_options_are_other_rewards(tmp_path):
    cfg = load_config(None, [])
    kwargs = dict(model="some/hub-model", cfg=cfg, verifier="numeric", params=rollout_sampling(cfg),
                  samples_per_prompt=2, prompts_per_batch=2, num_actors=1)
    run_episodes([], tmp_path / "eval", **kwargs, verifier_options={"rel_tol": 0.01})
    write_shard(tmp_path / "eval", ["a"], k=2)
    run_episodes([], tmp_path / "eval", **kwargs, verifier_options={"rel_tol": 0.01})
    changed = r"eval: made with other settings \(differ in: verifier_options\.rel_tol \(0\.01 then, 0\.1 now\)\)"
    with pytest.raises(RuntimeError, match=changed):
        run_episodes([], tmp_path / "eval", **kwargs, verifier_options={"rel_tol": 0.1})
    # An option set now that was left at its default then is a change too.
    added = r"eval: made with other settings \(differ in: verifier_options\.abs_tol \(None then, 5\.0 now\)\)"
    with pytest.raises(RuntimeError, match=added):
        run_episodes([], tmp_path / "eval", **kwargs, verifier_options={"rel_tol": 0.01, "abs_tol": 5.0})


def play_no_prompts(out_dir: Path, overrides: list[str], model: str = "some/hub-model") -> None:
    """Check `out_dir`'s manifest against the settings the config `overrides` make (no prompt is played)."""
    cfg = load_config(None, overrides)
    run_episodes([], out_dir, model=model, cfg=cfg, verifier="exact", verifier_options={},
                 params=rollout_sampling(cfg), samples_per_prompt=2, prompts_per_batch=2, num_actors=1)


def test_another_engine_or_dtype_plays_other_episodes(tmp_path):
    def play(*overrides: str) -> None:
        play_no_prompts(tmp_path / "eval", list(overrides))

    play()
    write_shard(tmp_path / "eval", ["a"], k=2)
    play("rollout.torch_threads=1")  # how fast, not what it plays
    with pytest.raises(RuntimeError, match=r"\(differ in: engine\.dtype \('auto' then, 'bfloat16' now\)\)"):
        play("rollout.dtype=bfloat16")
    with pytest.raises(RuntimeError, match=r"\(differ in: engine\.device \('cpu' then, unset now\); engine\.kind \('transformers' then, 'vllm' now\)\)"):
        play("rollout.engine=vllm", "rollout.gpus_per_actor=1")


@pytest.mark.parametrize(
    "first, second, differ",
    [
        # Another server may serve another model under the same name.
        (
            ["rollout.engine=openai", "rollout.api_base=http://server-a:8000/v1"],
            ["rollout.engine=openai", "rollout.api_base=http://server-b:9000/v1"],
            r"engine\.api_base \('http://server-a:8000/v1' then, 'http://server-b:9000/v1' now\)",
        ),
        # The transformers engine on a GPU computes otherwise than on the CPU.
        ([], ["rollout.gpus_per_actor=1"], r"engine\.device \('cpu' then, 'gpu' now\)"),
        # A shorter context cuts off replies the longer one lets finish.
        ([], ["rollout.max_model_len=1024"], r"engine\.max_model_len \(None then, 1024 now\)"),
        # Another split across GPUs sums in another order, as another dtype computes otherwise.
        (
            ["rollout.engine=vllm", "rollout.gpus_per_actor=1"],
            ["rollout.engine=vllm", "rollout.gpus_per_actor=2", "rollout.tensor_parallel_size=2"],
            r"engine\.tensor_parallel_size \(1 then, 2 now\)",
        ),
    ],
)
def test_another_server_or_tensor_parallel_split_plays_other_episodes(tmp_path, first, second, differ):
    def play(overrides: list[str]) -> None:
        play_no_prompts(tmp_path / "eval", overrides, model="served-model")

    play(first)
    write_shard(tmp_path / "eval", ["a"], k=2)
    play(first)
    with pytest.raises(RuntimeError, match=rf"\(differ in: {differ}\)"):
        play(second)


def test_rollouts_recorded_before_max_model_len_are_of_the_model_s_whole_context(tmp_path):
    def play(*overrides: str) -> None:
        play_no_prompts(tmp_path / "eval", list(overrides))

    play()
    write_shard(tmp_path / "eval", ["a"], k=2)
    manifest = json.loads((tmp_path / "eval" / MANIFEST).read_text())
    del manifest["engine"]["max_model_len"]  # as an earlier drift-ray wrote it
    (tmp_path / "eval" / MANIFEST).write_text(json.dumps(manifest))
    play()
    with pytest.raises(RuntimeError, match=r"\(differ in: engine\.max_model_len \(None then, 1024 now\)\)"):
        play("rollout.max_model_len=1024")


def test_a_server_address_with_a_trailing_slash_is_the_same_server(tmp_path):
    def play(api_base: str) -> None:
        play_no_prompts(tmp_path / "eval", ["rollout.engine=openai", f"rollout.api_base={api_base}"], model="served-model")

    play("http://server:8000/v1")
    write_shard(tmp_path / "eval", ["a"], k=2)
    play("http://server:8000/v1/")


def test_a_fingerprint_follows_the_content_wherever_the_files_are(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    weights = bytearray(range(256)) * (6 * 4096)  # 6 MiB: sampled, not read whole
    (model / "model.safetensors").write_bytes(weights)
    (model / "config.json").write_text('{"hidden_size": 8}')
    first = files_fingerprint(str(model))
    assert files_fingerprint("Qwen/Qwen2.5-3B-Instruct") is None  # a hub id: nothing local to read
    shutil.copytree(model, tmp_path / "copy")
    assert files_fingerprint(str(tmp_path / "copy")) == first  # content, not path or modification time
    (model / ".cache-lock").write_text("")
    assert files_fingerprint(str(model)) == first  # hidden files are not the model's

    def changed(edit) -> str:
        shutil.rmtree(tmp_path / "edited", ignore_errors=True)
        shutil.copytree(tmp_path / "copy", tmp_path / "edited")
        edit(tmp_path / "edited")
        return files_fingerprint(str(tmp_path / "edited"))

    def retrain_a_stretch(directory, start=3_000_000, length=8192):  # 1/768 of the file: under the sample stride
        data = bytearray((directory / "model.safetensors").read_bytes())
        data[start : start + length] = bytes(length)
        (directory / "model.safetensors").write_bytes(data)

    assert changed(retrain_a_stretch) != first
    assert changed(lambda d: (d / "config.json").write_text('{"hidden_size": 9}')) != first
    assert changed(lambda d: (d / "generation_config.json").write_text("{}")) != first
    # Subdirectories are the model's too (e.g. an adapter beside its base); hidden ones are not.
    assert changed(lambda d: (d / "adapter").mkdir() or (d / "adapter" / "adapter_config.json").write_text("{}")) != first
    assert changed(lambda d: (d / ".locks").mkdir() or (d / ".locks" / "lock").write_text("")) == first


def test_a_local_model_at_another_path_is_the_same_policy(tmp_path, monkeypatch):
    model = tmp_path / "runs" / "a" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"hidden_size": 8}')
    run_episodes([], tmp_path / "eval", **episode_kwargs(str(model)))
    write_shard(tmp_path / "eval", ["a"], k=2)
    shutil.move(tmp_path / "runs" / "a", tmp_path / "runs" / "b")  # a run_dir that moved
    monkeypatch.chdir(tmp_path)
    for spelled in ("runs/b/model", str(tmp_path / "runs" / "b" / "model")):
        summary = run_episodes([problem("a")], tmp_path / "eval", **episode_kwargs(spelled))
        assert (summary["reused"], summary["new"]) == (1, 0)


def test_a_local_model_replaced_at_the_same_path_is_another_policy(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    kwargs = episode_kwargs(str(model))
    run_episodes([], tmp_path / "eval", **kwargs)
    write_shard(tmp_path / "eval", ["a"], k=2)
    run_episodes([], tmp_path / "eval", **kwargs)
    (model / "config.json").write_text('{"hidden_size": 16}')
    with pytest.raises(RuntimeError, match=r"eval: made with other settings \(differ in: model_fingerprint \("):
        run_episodes([], tmp_path / "eval", **kwargs)


def test_ray_starts_only_for_episodes_to_play_and_before_anything_is_written(tmp_path):
    kwargs = episode_kwargs()
    out = tmp_path / "rollouts"
    refused = mock.Mock(side_effect=ValueError("no cluster here"))
    with pytest.raises(ValueError, match="no cluster here"):
        run_episodes([problem("a")], out, **kwargs, start_ray=refused)
    assert not out.exists()  # no manifest beside no shard
    out.mkdir()
    write_shard(out, ["a"], k=2)  # as if "a" had been played
    summary = run_episodes([problem("a")], out, **kwargs, start_ray=refused)
    assert (summary["new"], summary["reused"], refused.call_count) == (0, 1, 1)


def test_episodes_the_actors_wrote_where_this_process_cannot_see_them_are_an_error(tmp_path, monkeypatch):
    """As on a cluster whose run_dir is not shared: an actor on another node writes to that node's disk."""
    import ray.data

    out = tmp_path / "rollouts"

    class PlayedHereAndElsewhere:  # the Ray Data pipeline: "b" played on this node, "c" on another
        def map_batches(self, *args, **kwargs):
            return self

        def iter_batches(self, **kwargs):
            write_shard(out, ["b"], k=2)
            rows = [{schema.PROMPT_ID: p, "trajectories": 2, schema.COMPLETION_TOKENS: 10, schema.PROMPT_TOKENS: 6} for p in "bc"]
            yield pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)

    monkeypatch.setattr(ray.data, "from_arrow", lambda blocks: PlayedHereAndElsewhere())
    out.mkdir()
    write_shard(out, ["a"], k=2)  # played by an earlier run
    with pytest.raises(RuntimeError, match=(
        r"rollouts: the rollout actors played 2 problems, but this process finds the episodes of 1 of them nowhere "
        r"there \(e.g. 'c'\): an actor on another node wrote them .* must be storage that every node mounts"
    )):
        run_episodes([problem("a"), problem("b"), problem("c")], out, **episode_kwargs(), start_ray=lambda: None)


def test_runs_sharing_rollouts_take_turns_and_the_one_that_waited_reuses_what_the_other_played(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="drift_ray")
    kwargs = episode_kwargs()
    out = tmp_path / "rollouts"
    first_has_its_turn, first_may_end = threading.Event(), threading.Event()

    def first_plays_a():  # stands for the actors: "a" is written while the first run holds its turn
        first_has_its_turn.set()
        assert first_may_end.wait(timeout=30)
        raise RuntimeError("the first run ends here")

    def caught(fn):
        def run():
            with contextlib.suppress(RuntimeError):
                fn()
        return run

    first = threading.Thread(target=caught(lambda: run_episodes([problem("a")], out, **kwargs, start_ray=first_plays_a)))
    summaries = []
    no_cluster = mock.Mock(side_effect=ValueError("nothing was left to play"))
    second = threading.Thread(target=lambda: summaries.append(run_episodes([problem("a")], out, **kwargs, start_ray=no_cluster)))
    first.start()
    assert first_has_its_turn.wait(timeout=30)
    second.start()
    deadline = time.monotonic() + 30
    while "waiting for pid" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"waiting for pid {os.getpid()} on " in caplog.text and second.is_alive()
    out.mkdir()
    write_shard(out, ["a"], k=2)  # what the first run's actors played
    first_may_end.set()
    first.join(timeout=30)
    second.join(timeout=30)
    [summary] = summaries
    assert (summary["new"], summary["reused"], no_cluster.call_count) == (0, 1, 0)
    assert summary["waited_seconds"] > 0


def test_a_run_with_nothing_left_to_play_neither_waits_for_its_turn_nor_writes_beside_the_rollouts(tmp_path):
    kwargs = episode_kwargs()
    out = tmp_path / "rollouts"
    out.mkdir()
    write_shard(out, ["a"], k=2)
    summaries = []
    reuse = threading.Thread(target=lambda: summaries.append(run_episodes([problem("a")], out, **kwargs)))
    reuse.start()
    reuse.join(timeout=30)
    assert not rollouts_lock_file(out).exists()  # so a directory of another user's can be reused
    with exclusive_lock(rollouts_lock_file(out)):  # another run, playing other prompts into it
        reuse = threading.Thread(target=lambda: summaries.append(run_episodes([problem("a")], out, **kwargs)))
        reuse.start()
        reuse.join(timeout=30)
    assert [(s["new"], s["reused"], s["waited_seconds"]) for s in summaries] == [(0, 1, 0), (0, 1, 0)]


def test_manifest_refuses_other_settings_once_a_shard_is_there(tmp_path):
    def check_and_record(settings):  # as run_episodes does
        check_manifest(tmp_path, settings)
        record_manifest(tmp_path, settings)

    check_and_record({"model": "mistyped", "samples_per_prompt": 2})
    check_and_record({"model": "m", "samples_per_prompt": 2})  # no episode played yet: corrected
    write_shard(tmp_path, ["a"], k=2)
    check_and_record({"model": "m", "samples_per_prompt": 2})  # same settings: fine
    with pytest.raises(RuntimeError, match="differ in: samples_per_prompt"):
        check_manifest(tmp_path, {"model": "m", "samples_per_prompt": 4})
    record_manifest(tmp_path, {"model": "m", "samples_per_prompt": 4})  # the shards keep the record of theirs
    with pytest.raises(RuntimeError, match="differ in: samples_per_prompt"):
        check_manifest(tmp_path, {"model": "m", "samples_per_prompt": 4})
    (tmp_path / MANIFEST).write_text('{"model": "m", "sam')  # cut short: a full disk, a killed copy
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / MANIFEST}: not valid JSON (Unterminated string")):
        check_manifest(tmp_path, {"model": "m", "samples_per_prompt": 2})


def test_the_manifest_leaves_the_directory_readable_as_parquet_and_an_earlier_name_still_guards(tmp_path):
    """Before, manifest.json among the shards stopped pyarrow and pandas reading the directory whole."""
    record_manifest(tmp_path, {"model": "m", "samples_per_prompt": 2})
    write_shard(tmp_path, ["a", "b"], k=2)
    assert pq.read_table(tmp_path).num_rows == 4
    # An earlier drift-ray's manifest guards its shards still, and one beside no shard gives way.
    (tmp_path / MANIFEST).rename(tmp_path / MANIFEST_BEFORE)
    with pytest.raises(RuntimeError, match=re.escape(f"recorded in {tmp_path / MANIFEST_BEFORE}")):
        check_manifest(tmp_path, {"model": "m", "samples_per_prompt": 4})
    record_manifest(tmp_path, {"model": "m", "samples_per_prompt": 4})
    assert not (tmp_path / MANIFEST).exists()
    for shard in tmp_path.glob(SHARD_GLOB):
        shard.unlink()
    record_manifest(tmp_path, {"model": "m", "samples_per_prompt": 4})
    assert [path.name for path in tmp_path.iterdir()] == [MANIFEST]
    assert json.loads((tmp_path / MANIFEST).read_text())["samples_per_prompt"] == 4


def test_a_damaged_record_of_what_trained_a_model_is_named(tmp_path):
    model = tmp_path / "model"
    write_json_atomic({"train": {"lr": 0.1}, "seed": 0}, model / TRAIN_SETTINGS_FILE)
    assert trained_by(str(model)) == {"train": {"lr": 0.1}, "seed": 0}
    (model / TRAIN_SETTINGS_FILE).write_text("[]")
    with pytest.raises(ValueError, match=re.escape(f"{model / TRAIN_SETTINGS_FILE}: holds a JSON array, not an object; ")):
        trained_by(str(model))


def test_summary_counts_per_prompt():
    problems = [Problem("a", "q", "1"), Problem("b", "q", "2")]
    trajectories = pa.Table.from_pylist(trajectory_rows("a", 3) + trajectory_rows("b", 3), schema=schema.TRAJECTORY_SCHEMA)
    table = summarize(problems, trajectories, seconds=2.0)
    assert table.column("trajectories").to_pylist() == [3, 3]
    assert table.column("solved").to_pylist() == [1, 1]
    assert table.column(schema.COMPLETION_TOKENS).to_pylist() == [15, 15]


@pytest.mark.ray
def test_ray_rollouts_resume_after_interruption(tmp_path, ray_cluster, tiny_model_dir, caplog):
    cfg = load_config(None, ['episode.instruction="{question}"', "episode.max_turns=2", "rollout.max_new_tokens=6",
                             "rollout.cpus_per_actor=1", "seed=7"])
    problems = [Problem(f"p{i}", f"x is between 10 and 29, and x+1 ends in {i}. What is x?", "9") for i in range(6)]
    out = tmp_path / "rollouts"
    kwargs = dict(model=tiny_model_dir, cfg=cfg, verifier="exact", verifier_options={}, params=rollout_sampling(cfg),
                  samples_per_prompt=3, prompts_per_batch=2, num_actors=2)

    # A "killed" first run: only the first batch made it to disk, plus a half-written temporary file.
    first = run_episodes(problems[:2], out, **kwargs)
    assert first["new"] == 2 and first["trajectories"] == 6
    (out / ".part-deadbeef.parquet.0.tmp").write_bytes(b"PAR1 partial")

    with caplog.at_level(logging.INFO, logger="drift_ray.rollouts"):
        second = run_episodes(problems, out, **kwargs)
    assert (second["reused"], second["new"], second["trajectories"]) == (2, 4, 12)
    assert f"{out}: 2 of the 6 problems were played already; playing the other 4" in caplog.text
    table = read_shards(out)
    ids = table.column(schema.TRAJECTORY_ID).to_pylist()
    assert len(ids) == len(set(ids)) == 6 * 3
    assert set(table.column(schema.PROMPT_ID).to_pylist()) == {p.prompt_id for p in problems}
    assert all(1 <= n <= 2 for n in table.column(schema.NUM_TURNS).to_pylist())
    assert set(table.column(schema.MODEL).to_pylist()) == {tiny_model_dir}

    # A rerun has nothing left to do and writes nothing.
    shards = sorted(out.glob("part-*.parquet"))
    third = run_episodes(problems, out, **kwargs)
    assert third["new"] == 0 and sorted(out.glob("part-*.parquet")) == shards

    # Same seed, same batches: a fresh directory reproduces the trajectories exactly.
    again = tmp_path / "again"
    run_episodes(problems, again, **kwargs)
    assert read_shards(again).column(schema.MESSAGES).to_pylist() == table.column(schema.MESSAGES).to_pylist()

    with pytest.raises(RuntimeError, match="other settings"):
        run_episodes(problems, out, **{**kwargs, "samples_per_prompt": 2})


@pytest.mark.ray
@pytest.mark.parametrize("verifier", ["math", "reasoning_gym"])
def test_a_verifier_in_a_ray_actor_times_out_in_its_helper_processes(ray_cluster, verifier):
    """Rollout actors verify answers in helper processes spawned from a Ray worker, which a runaway answer
    cannot hold up past its timeout."""
    if verifier == "math":
        right, right_too, runaway, gold = "\\frac{1}{2}", "1/2", "(10^{7})!", "0.5"
    else:
        pytest.importorskip("reasoning_gym")
        from drift_ray.gym_tasks import GymGold
        from drift_ray.prompts import load_task

        problem = load_task(TaskConfig(kind="reasoning_gym", name="simple_integration", options={"size": 2}), seed=0).test[0]
        stored = GymGold.from_json(problem.gold)
        right, right_too, gold = stored.answer, f"{stored.answer} + 0", problem.gold
        runaway = "*".join(f"({stored.metadata['variable']}+{k})**20" for k in range(1, 9))  # 20 s of simplify

    @ray_cluster.remote(num_cpus=0)
    class Checker:
        def __init__(self):
            self.verifier = get_verifier(verifier, timeout_s=2.0)

        def check(self, answer: str) -> tuple[bool, float]:
            started = time.monotonic()
            return self.verifier.check(answer, gold), time.monotonic() - started

    checker = Checker.remote()
    assert ray_cluster.get(checker.check.remote(right))[0]  # starts the helpers: start-up is not timed
    correct, seconds = ray_cluster.get(checker.check.remote(runaway))
    assert not correct and 2.0 <= seconds < 6.0
    assert ray_cluster.get(checker.check.remote(right_too))[0]  # not cached: a new helper took over
