"""End to end: the smoke config through Ray Data, Ray Train + DeepSpeed and evaluation, locally and
as a job submitted to a `ray start --head` cluster."""

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from drift_ray import schema
from drift_ray.cli import main
from drift_ray.config import load_config, validate_config
from drift_ray.pipeline import (
    CONFIG_FILE,
    RUN_LOCK_FILE,
    RUN_LOG_FILE,
    RUN_RECORD_FILE,
    WEIGHTED_DIR,
    WEIGHTS_DIAGNOSTICS_FILE,
    WEIGHTS_SETTINGS_FILE,
    evaluation_task,
    lock_run_dir,
    resolve_model,
    run_weights,
    training_task,
    weights_finished,
)
from drift_ray.prompts import TaskError, load_task
from drift_ray.train import require_training_input
from drift_ray.trajectories import read_trajectories
from tests.conftest import free_ports

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(autouse=True)
def no_ray_left_behind():
    """`drift-ray run` starts Ray in this process; later tests start their own clusters."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def smoke_overrides(run_dir: Path, model: str) -> list[str]:
    return [f"run_dir={run_dir}", f"rollout.model={model}"]


def test_smoke_pipeline_end_to_end_and_rerun_skips(tmp_path, tiny_model_dir, capsys, caplog):
    run_dir = tmp_path / "run"
    # Training takes both CPUs of the smoke cluster, so that a 1-CPU cluster can evaluate but not train
    # (the end of this test).
    run = ["run", "--config", str(REPO / "jobs/smoke.yaml"), *smoke_overrides(run_dir, tiny_model_dir),
           "train.cpus_per_worker=2"]
    with caplog.at_level(logging.INFO, logger="drift_ray"):  # as the command's own logging shows them
        assert main(run) == 0
    assert not logging.getLogger("drift_ray").handlers  # run_dir's log closed with the command
    out = capsys.readouterr().out
    assert "| reference" in out and "| drift" in out and "eval.png" in out
    metrics = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert set(metrics) == {"reference", "drift"}
    assert metrics["drift"]["num_problems"] == 8
    assert (run_dir / "eval" / "eval.md").read_text().startswith(
        "Task 'candidates': 8 test problems, verifier 'exact'; one greedy episode of up to 3 turns per problem, "
        "replies of up to 48 new tokens, feedback 'Incorrect. Please think again.'.\n\n| "
    )
    assert (run_dir / "train" / "model" / "config.json").exists()
    # Readable as any file this user makes, by a serving process of another user too (see publish_directory).
    (tmp_path / "probe").touch()
    (tmp_path / "probe-dir").mkdir()
    model_dir = run_dir / "train" / "model"
    model_files = list(model_dir.iterdir())
    assert "model.safetensors" in {p.name for p in model_files}
    assert {p.stat().st_mode & 0o777 for p in model_files} == {(tmp_path / "probe").stat().st_mode & 0o777}
    assert model_dir.stat().st_mode & 0o777 == (tmp_path / "probe-dir").stat().st_mode & 0o777
    assert len(list((run_dir / "rollouts").glob("part-*.parquet"))) == 2  # 8 prompts, 4 per batch
    # The run's own lines stay in run_dir, where the console's scroll away among Ray's.
    logged = (run_dir / RUN_LOG_FILE).read_text()
    assert f" {os.getpid()} drift_ray INFO drift-ray run, pid {os.getpid()} on {socket.gethostname()}: logging to {run_dir / RUN_LOG_FILE}\n" in logged
    assert "INFO weights: {" in logged and "INFO training: {" in logged and "reached rollout.max_new_tokens=48" in logged
    assert logged.endswith("INFO ended: finished\n")
    # Each directory of shards reads whole, as Parquet readers take one.
    assert pq.read_table(run_dir / "rollouts").num_rows == 8 * 4 and pq.read_table(run_dir / "eval" / "drift").num_rows == 8
    diagnostics = json.loads((run_dir / "weighted" / WEIGHTS_DIAGNOSTICS_FILE).read_text())
    assert diagnostics["num_trajectories"] == 8 * 4 and abs(diagnostics["weight_mean"] - 1) < 1e-9
    # The random tiny model often writes on to max_new_tokens: the shards record which replies it cut off.
    shards = sorted((run_dir / "rollouts").glob("part-*.parquet"))
    flags = [flag for row in pq.read_table(shards).column(schema.CUT_OFF).to_pylist() for flag in row]
    assert 0 < sum(flags) and diagnostics["cut_off_reply_share"] == pytest.approx(sum(flags) / len(flags))
    assert "of the rollouts' replies (of those recorded) reached rollout.max_new_tokens=48" in caplog.text
    assert metrics["reference"]["cut_off_rate"] > 0
    assert "of reference's replies (of those recorded) reached max_new_tokens=48" in caplog.text
    printed = json.JSONDecoder().raw_decode(out, out.index('{\n  "timings_s"'))[0]
    stages = list(printed["timings_s"])  # in the order they ran (run.json sorts them)
    assert stages.index("ray_start") == stages.index("rollouts") - 1  # started by the rollouts, timed apart
    record = json.loads((run_dir / RUN_RECORD_FILE).read_text())
    assert record["timings_s"] == printed["timings_s"]
    assert record["config"] == json.loads((run_dir / CONFIG_FILE).read_text())
    assert record["config"]["run_dir"] == str(run_dir)
    [work] = record["work_by_round"]
    rollouts = work["rollouts"]
    assert (rollouts["problems"], rollouts["reused"], rollouts["new"], rollouts["trajectories"]) == (8, 0, 8, 8 * 4)
    assert (work["weights_reused"], work["model_reused"], work["resumed_from_step"]) == (False, False, 0)
    assert record["metrics"] == metrics  # the run's own, which a later `drift-ray eval` there does not rewrite
    assert record["models"] == {"reference": tiny_model_dir, "drift": str(model_dir)}

    # A rerun finds every stage's output, redoes nothing and starts no Ray; it prints the same table.
    import ray

    ray.shutdown()
    # Lock files are rewritten by each run that takes them, to name it.
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and "eval" not in p.parts
              and p.suffix not in (".lock", ".log")}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="drift_ray"):
        assert main(run) == 0
    assert not ray.is_initialized()
    # The log tells the stages' reused outputs from work done: the training's seconds are an earlier run's.
    assert f"weights: {run_dir / 'weighted'} holds them, weighed with these settings before; their diagnostics: {{" in caplog.text
    assert f"training: {model_dir} holds the model, trained with these settings before; its statistics: {{" in caplog.text
    assert "eval: reference: {'problems': 8, 'reused': 8, 'new': 0, 'waited_seconds': 0.0, 'seconds': " in caplog.text
    assert "eval: drift: {'problems': 8, 'reused': 8, 'new': 0," in caplog.text
    record = json.loads((run_dir / RUN_RECORD_FILE).read_text())
    assert "ray_start" not in record["timings_s"]
    [work] = record["work_by_round"]  # so that its seconds are not taken for a cost
    assert (work["rollouts"]["reused"], work["rollouts"]["new"], work["weights_reused"], work["model_reused"]) == (
        8, 0, True, True
    )
    assert capsys.readouterr().out.split("\n| ", 1)[1] == out.split("\n| ", 1)[1]
    after = {p: p.stat().st_mtime_ns for p in before}
    rewritten = {CONFIG_FILE, RUN_RECORD_FILE}
    changed = [str(p) for p in before if before[p] != after[p] and p.name not in rewritten]
    assert not changed

    # A rerun with other settings is refused at the first stage whose finished output they would change,
    # instead of reporting that output as theirs, and it changes nothing.
    settled = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.suffix not in (".lock", ".log")}
    for overrides, stage, setting, explained in [
        (["weights.beta=0.5"], "weighted", "weights.beta (0.1 then, 0.5 now)", ""),
        (["train.lr=0.001"], "train/model", "train.lr", ""),
        (["task.num_train=6"], "weighted", "prompts.count (8 then, 6 now)", "; prompts: the training problems, which the task.* keys and seed choose)"),
        # Refused before the rollouts play, or the 2 problems added would be played for nothing.
        (["task.num_train=10", "task.options.num_train=10"], "weighted", "prompts.count (8 then, 10 now)", ""),
    ]:
        assert main([*run, *overrides]) == 2
        error = capsys.readouterr().err
        assert f"{run_dir / stage}: made with other settings (differ in: {setting}" in error and explained in error
        # A new run_dir of its own would play the rollouts again: the remedy says how to keep them.
        assert error.endswith(f"Rerun with the same config, or use a new run_dir with rollout.output_dir={run_dir / 'rollouts'} "
                              "to weigh and train on these rollouts instead of playing them again (the rollouts of "
                              "problems they lack are added there).\n")
        assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.suffix not in (".lock", ".log")} == settled
        assert not ray.is_initialized()
        assert (run_dir / RUN_LOG_FILE).read_text().endswith(f"ERROR ended: RuntimeError: {error.partition('error: ')[2]}")
    # Rollouts of another seed are refused before the reference that would play them is built (minutes for
    # builtin:demo), by the setting that differs rather than by that reference's cache path.
    with mock.patch("drift_ray.demo_model.ensure_demo_model", side_effect=AssertionError("the reference was built")):
        assert main([*run, "rollout.model=builtin:demo", "seed=1"]) == 2
    error = capsys.readouterr().err
    assert (f"{run_dir / 'rollouts'}: made with other settings (differ in: sampling.seed (0 then, 1 now); sampling.seed: "
            "seed in the config), recorded in ") in error
    # So are evaluations of other settings, by `run` and by `eval`, before any model is built.
    changed = ["eval.max_new_tokens=40", "rollout.model=builtin:demo"]
    evaluate_demo = ["eval", "--config", str(REPO / "jobs/smoke.yaml"), f"run_dir={run_dir}", changed[0], "--model",
                     "reference=builtin:demo"]
    for command in [[*run, *changed], evaluate_demo]:
        with mock.patch("drift_ray.demo_model.ensure_demo_model", side_effect=AssertionError("the reference was built")):
            assert main(command) == 2
        error = capsys.readouterr().err
        assert (f"{run_dir / 'eval' / 'reference'}: made with other settings (differ in: sampling.max_new_tokens (48 then, "
                "40 now); sampling.max_new_tokens: eval.max_new_tokens (default: rollout.max_new_tokens) in the config), "
                "recorded in ") in error
    # Another model under a label evaluated already: the remedy is another label, or its evaluation removed.
    evaluate = ["eval", "--config", str(REPO / "jobs/smoke.yaml"), f"run_dir={run_dir}", "--model", f"reference={model_dir}"]
    assert main(evaluate) == 2
    error = capsys.readouterr().err
    assert f"{run_dir / 'eval' / 'reference'}: made with other settings (differ in: model (" in error
    assert error.endswith(f"Rerun with the same config, remove {run_dir / 'eval' / 'reference'} to evaluate reference "
                          "again, or use a new run_dir; `drift-ray eval --model LABEL=MODEL` evaluates a model under a "
                          "label of its own.\n")
    assert not ray.is_initialized()

    # Rollouts played again under the same settings (a shard removed and its prompts replayed, say after
    # the task file changed) are other rollouts: the weights of the old ones are refused, with a remedy
    # that works.
    played = shards[0].read_bytes()
    table = pq.read_table(shards[0])
    conversations = table.column(schema.MESSAGES).to_pylist()
    conversations[0][-1]["content"] += " again"
    replayed = pa.array(conversations, table.schema.field(schema.MESSAGES).type)
    pq.write_table(table.set_column(table.schema.get_field_index(schema.MESSAGES), schema.MESSAGES, replayed), shards[0])
    assert main(run) == 2
    refused = capsys.readouterr().err
    assert f"{run_dir / 'weighted'}: made with other settings (differ in: rollouts_fingerprint (" in refused
    assert f"What it was made from changed since: remove {run_dir / 'weighted'} to make it again" in refused
    assert not ray.is_initialized()
    shards[0].write_bytes(played)

    # A smaller test split is evaluated on its own problems, from the episodes already played. And weighted
    # rollouts without their records (an earlier drift-ray kept them beside) are weighed again, the same.
    (run_dir / "weighted" / WEIGHTS_DIAGNOSTICS_FILE).unlink()
    assert main([*run, "task.num_test=5"]) == 0
    assert json.loads((run_dir / "weighted" / WEIGHTS_DIAGNOSTICS_FILE).read_text()) == diagnostics
    smaller = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert smaller["drift"]["num_problems"] == 5 and smaller["reference"]["num_problems"] == 5

    # A run whose training is finished evaluates on a cluster too small to train: a local cluster is
    # checked for the stages with work left, not for the finished ones.
    shutil.rmtree(run_dir / "eval" / "drift")
    ray.shutdown()
    assert main([*run, "task.num_test=5", "ray.num_cpus=1"]) == 0
    assert ray.cluster_resources()["CPU"] == 1
    assert json.loads((run_dir / "eval" / "eval.json").read_text())["drift"]["num_problems"] == 5
    assert (run_dir / "eval" / "drift").is_dir()

    # Weights deleted by hand to redo them with another β, and that run killed after recording its settings
    # but before its diagnostics: nothing is published, to be taken for finished weights.
    ray.shutdown()
    shutil.rmtree(run_dir / "weighted")
    with mock.patch("drift_ray.pipeline.write_json_atomic", side_effect=[None, KeyboardInterrupt]):
        assert main([*run, "weights.beta=0.5"]) == 130
    assert "drift-ray run: interrupted; run the same command again" in capsys.readouterr().err
    assert not (run_dir / "weighted").exists()
    assert (run_dir / RUN_LOG_FILE).read_text().endswith("ERROR ended: interrupted; run the same command again to go on\n")

    # Rollouts played before cut_off was recorded, beside later ones (a rerun after an upgrade): every
    # weighted file holds the column, null for the older rollouts' rows. That run then stops at the
    # training, finished with β 0.1.
    ray.shutdown()
    pq.write_table(pq.read_table(shards[0]).drop_columns([schema.CUT_OFF]), shards[0])
    assert main([*run, "weights.beta=0.5"]) == 2
    assert "train/model: made with other settings (differ in: " in capsys.readouterr().err
    weighted = [pq.read_table(file) for file in sorted((run_dir / "weighted").glob("*.parquet"))]
    assert all(schema.CUT_OFF in table.column_names for table in weighted)
    assert sum(table.column(schema.CUT_OFF).null_count for table in weighted) == pq.read_metadata(shards[0]).num_rows


def played_rollouts(out: Path, problems, cfg, k: int) -> None:
    """K one-turn episodes of every problem, as the rollouts stage leaves them: even samples answer right."""
    from drift_ray.episode import Episode, Generation, episodes_table, first_messages
    from drift_ray.rollouts import MANIFEST, shard_path
    from drift_ray.trajectories import write_json_atomic, write_table_atomic
    from drift_ray.verifiers import ExactVerifier

    episodes = []
    for problem in problems:
        for i in range(k):
            episode = Episode(problem, i, first_messages(problem.question, cfg.episode))
            answer = problem.gold if i % 2 == 0 else f"not {problem.gold}"
            episode.take_turn(Generation(f"<answer>{answer}</answer>", 10, 5 + i), ExactVerifier(), cfg.episode)
            episodes.append(episode)
    write_table_atomic(episodes_table(episodes, cfg.episode, "m"), shard_path(out, problems))
    write_json_atomic({"samples_per_prompt": k, "sampling": {"max_new_tokens": 48}}, out / MANIFEST)


def test_the_weights_stage_is_done_by_the_records_it_publishes_not_by_files_beside_them(tmp_path):
    """`drift-ray weights --output run_dir/weighted.parquet` writes weighted.diagnostics.json beside its output,
    where the weights stage kept its own diagnostics: a rerun reported the other β's as its own, and once a
    run was killed between publishing run_dir/weighted and recording its settings, the stage counted as done
    for any config."""
    import ray

    from drift_ray.train import require_training_input

    def start_ray() -> None:
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)

    def no_ray() -> None:
        raise AssertionError("redid finished weights")

    run_dir = tmp_path / "run"
    weighted = run_dir / WEIGHTED_DIR
    cfg = load_config(str(REPO / "jobs/smoke.yaml"), [f"run_dir={run_dir}"])
    other_beta = load_config(str(REPO / "jobs/smoke.yaml"), [f"run_dir={run_dir}", "weights.beta=0.5"])
    task = load_task(cfg.task, cfg.seed)
    played_rollouts(run_dir / "rollouts", task.train, cfg, k=4)
    diagnostics = run_weights(cfg, task, start_ray)
    assert diagnostics["num_trajectories"] == 8 * 4
    assert json.loads((weighted / WEIGHTS_DIAGNOSTICS_FILE).read_text()) == diagnostics
    assert json.loads((weighted / WEIGHTS_SETTINGS_FILE).read_text())["weights"]["beta"] == 0.1
    # The records inside are no input to the readers of the weighted rollouts.
    require_training_input(str(weighted))
    assert ray.data.read_parquet(str(weighted)).count() == pq.read_table(weighted).num_rows == 8 * 4

    # The standalone command's output in run_dir, its diagnostics beside it: the stage keeps its own.
    authors = REPO / "tests/fixtures/authors_sample.jsonl"
    standalone = ["weights", "--input", str(authors), "--output", str(run_dir / "weighted.parquet"), "--beta", "0.5"]
    assert main(standalone) == 0
    assert json.loads((run_dir / "weighted.diagnostics.json").read_text()) != diagnostics
    assert run_weights(cfg, task, no_ray) == diagnostics
    other_settings = f"{weighted}: made with other settings (differ in: weights.beta (0.1 then"
    with pytest.raises(RuntimeError, match=re.escape(other_settings)):
        run_weights(other_beta, task, no_ray)

    # Killed after weighing with another β, before its records were written: nothing was published, so the
    # next run weighs again (the standalone output's diagnostics beside it mark nothing).
    shutil.rmtree(weighted)
    with mock.patch("drift_ray.pipeline.write_json_atomic", side_effect=KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            run_weights(other_beta, task, start_ray)
    assert not weights_finished(run_dir)
    assert main(standalone) == 0
    reweighed = run_weights(other_beta, task, start_ray)
    assert reweighed["num_trajectories"] == 8 * 4 and reweighed != diagnostics
    assert json.loads((weighted / WEIGHTS_SETTINGS_FILE).read_text())["weights"]["beta"] == 0.5

    # Weights published by an earlier version, their records beside them: weighed again.
    for name in (WEIGHTS_DIAGNOSTICS_FILE, WEIGHTS_SETTINGS_FILE):
        (weighted / name).rename(run_dir / f"weighted.{name.strip('_')}")
    assert not weights_finished(run_dir)
    assert run_weights(other_beta, task, start_ray) == reweighed and weights_finished(run_dir)

    # A record cut short is named, with a remedy.
    (weighted / WEIGHTS_DIAGNOSTICS_FILE).write_text('{"num_trajectories": 3')
    with pytest.raises(ValueError) as refused:
        run_weights(other_beta, task, no_ray)
    assert str(refused.value).startswith(f"{weighted / WEIGHTS_DIAGNOSTICS_FILE}: not valid JSON (")
    assert str(refused.value).endswith(f"remove {weighted} to weigh the rollouts again")


def test_evaluating_on_questions_the_run_trains_on_is_warned_about(tmp_path, caplog):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "gold": str(i + 1)}) + "\n" for i in range(4)))
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"question": "What is  1 + 1?", "gold": "2"}) + "\n" + json.dumps({"question": "New?", "gold": "1"}) + "\n")
    settings = {"task": {"kind": "file", "name": "sums", "train_path": str(train), "test_path": str(test)}}
    cfg = validate_config(settings)
    task = load_task(cfg.task, cfg.seed)
    assert evaluation_task(cfg, task) == task
    assert "1 of the 2 test problems of task 'sums' ask a question that the training problems of task 'sums' ask" in caplog.text
    caplog.clear()
    evaluation_task(validate_config({**settings, "eval": {"task": {**settings["task"], "test_path": str(train)}}}), task)
    assert "4 of the 4 test problems" in caplog.text
    caplog.clear()
    # An eval.task copied from a task whose training file is elsewhere: its test split alone is read.
    copied = {**settings["task"], "train_path": str(tmp_path / "elsewhere.jsonl"), "num_train": 1}
    assert evaluation_task(validate_config({**settings, "eval": {"task": copied}})).test == task.test
    caplog.clear()
    evaluation_task(cfg)  # `drift-ray eval` does not know what the models were trained on
    assert "test problems" not in caplog.text
    # Nor does it read the training file, which need not be on the machine that evaluates.
    elsewhere = validate_config({"task": {**settings["task"], "train_path": str(tmp_path / "elsewhere.jsonl")}})
    assert evaluation_task(elsewhere).test == task.test


def test_the_authors_trajectories_go_through_the_weights_and_train_commands(tmp_path, tiny_model_dir, capsys):
    """Decoupled use: rollouts collected elsewhere, in the authors' JSONL, weighed and trained on here."""
    from transformers import AutoModelForCausalLM

    from drift_ray.train import STEPS_FILE

    weighted = tmp_path / "authors.weighted.parquet"
    authors = REPO / "tests/fixtures/authors_sample.jsonl"
    assert main(["weights", "--input", str(authors), "--output", str(weighted)]) == 0
    run_dir = tmp_path / "run"
    args = ["train", "--config", str(REPO / "jobs/smoke.yaml"), "--input", str(weighted), "--model", tiny_model_dir]
    assert main([*args, f"run_dir={run_dir}", "train.global_batch_size=2", "train.micro_batch_size=1"]) == 0
    assert f"trained model in {run_dir / 'train' / 'model'}" in capsys.readouterr().out

    model_dir = run_dir / "train" / "model"
    stats = json.loads((model_dir / "drift_train.json").read_text())
    assert stats["examples"] == 6 and stats["steps"] == 3
    assert len((model_dir / STEPS_FILE).read_text().splitlines()) == 3
    trained = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not trained[name].equal(initial[name]) for name in initial)

    # A rerun finds the model and starts no Ray.
    import ray

    ray.shutdown()
    assert main([*args, f"run_dir={run_dir}", "train.global_batch_size=2", "train.micro_batch_size=1"]) == 0
    assert not ray.is_initialized() and json.loads((model_dir / "drift_train.json").read_text()) == stats

    # The JSONL itself, unweighted, is refused with its name before any training starts.
    args[args.index("--input") + 1] = str(authors)
    assert main([*args, f"run_dir={tmp_path / 'unweighted'}"]) == 2
    assert "authors_sample.jsonl: not a Parquet file" in capsys.readouterr().err
    assert not (tmp_path / "unweighted" / "train").exists()


def test_eval_refuses_two_models_under_one_label_before_starting_ray(tmp_path, tiny_model_dir, capsys):
    other = tmp_path / "other" / Path(tiny_model_dir).name  # another model whose directory has the same name
    args = ["eval", "--config", str(REPO / "jobs/smoke.yaml"), f"run_dir={tmp_path / 'run'}"]
    assert main([*args, "--model", tiny_model_dir, "--model", str(other)]) == 2
    label = Path(tiny_model_dir).name
    assert f"--model: two models labelled {label!r}; label each, e.g. --model {label}-2={other}" in capsys.readouterr().err


@pytest.mark.parametrize("label", ["", "..", ".hidden", "eval.json"])
def test_eval_refuses_a_label_that_is_no_directory_name_of_its_own(tmp_path, tiny_model_dir, capsys, label):
    args = ["eval", "--config", str(REPO / "jobs/smoke.yaml"), f"run_dir={tmp_path / 'run'}"]
    assert main([*args, "--model", f"{label}={tiny_model_dir}"]) == 2
    assert f"the label {label!r} names the directory eval/{label}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_eval_of_labelled_models_prints_their_table_and_a_rerun_plays_nothing(tmp_path, tiny_model_dir, capsys):
    import ray

    run_dir = tmp_path / "run"
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")  # labelled by its directory's name
    args = ["eval", "--config", str(REPO / "jobs/smoke.yaml"), f"run_dir={run_dir}",
            "--model", f"ref={tiny_model_dir}", "--model", str(copy)]
    ray.shutdown()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "\n| ref |" in out and "\n| copy |" in out and f"plot: {run_dir / 'eval' / 'eval.png'}" in out
    metrics = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert set(metrics) == {"ref", "copy"} and metrics["ref"]["num_problems"] == 8
    assert metrics["ref"] == metrics["copy"]  # the same files play the same greedy episodes
    ray.shutdown()
    assert main(args) == 0  # every episode is there: read, not played
    assert not ray.is_initialized() and capsys.readouterr().out == out


@pytest.mark.parametrize("command", ["run", "rollouts", "train", "eval"])
def test_a_command_into_a_run_dir_another_process_writes_is_refused_before_any_work(
    tmp_path, tiny_model_dir, capsys, command
):
    run_dir = tmp_path / "run"
    weighted = tmp_path / "weighted.parquet"
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    pq.write_table(pa.table({schema.TRAJECTORY_ID: ["q/0"], schema.MESSAGES: [conversation], schema.WEIGHT: [1.0]}), weighted)
    extra = {"train": ["--input", str(weighted)], "eval": ["--model", tiny_model_dir]}.get(command, [])
    args = [command, "--config", str(REPO / "jobs/smoke.yaml"), *extra, *smoke_overrides(run_dir, tiny_model_dir)]
    # In this process: an flock conflicts with every other open of its file.
    with lock_run_dir(load_config(None, [f"run_dir={run_dir}"]), "a test", writes_rollouts=False):
        assert main(args) == 2
    error = capsys.readouterr().err
    assert f"{run_dir} is in use by pid {os.getpid()} on " in error and len(error.splitlines()) == 1
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([RUN_LOCK_FILE, RUN_LOG_FILE])
    assert "is in use" not in (run_dir / RUN_LOG_FILE).read_text()  # the holder's log alone


def test_run_dir_s_log_says_that_the_command_before_was_killed(tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"run_dir={run_dir}"])
    with lock_run_dir(cfg, "finished", writes_rollouts=False):
        pass
    with contextlib.suppress(ValueError), lock_run_dir(cfg, "failed", writes_rollouts=False):
        raise ValueError("a multi-line\nerror")
    with lock_run_dir(cfg, "second", writes_rollouts=False):
        pass
    assert "ERROR ended: ValueError: a multi-line\nerror\n" in (run_dir / RUN_LOG_FILE).read_text()
    assert "stopped without a line saying how" not in (run_dir / RUN_LOG_FILE).read_text()
    # A command still running on this machine (beside this one, on a file system without locks) is not one killed.
    with (run_dir / RUN_LOG_FILE).open("a") as log_file:
        log_file.write(f"2026-01-01 00:00:00,000 {os.getpid()} drift_ray INFO drift-ray eval, pid {os.getpid()} on {socket.gethostname()}: logging to x\n")
    with lock_run_dir(cfg, "beside it", writes_rollouts=False):
        pass
    assert "stopped without a line saying how" not in (run_dir / RUN_LOG_FILE).read_text()
    # As SIGKILL leaves it: its header, lines, and no end of its own (another pid's lines may come between).
    with (run_dir / RUN_LOG_FILE).open("a") as log_file:
        log_file.write(f"2026-01-01 00:00:00,000 4242 drift_ray INFO drift-ray run, pid 4242 on node-7: logging to {run_dir / RUN_LOG_FILE}\n")
        log_file.write("2026-01-01 00:00:01,000 4242 drift_ray INFO rollouts: {'problems': 8}\n")
        log_file.write("2026-01-01 00:00:02,000 4343 drift_ray INFO ended: finished\n")
    for command in ("after the kill", "after that"):
        with lock_run_dir(cfg, command, writes_rollouts=False):
            pass
    logged = (run_dir / RUN_LOG_FILE).read_text()
    assert logged.count("stopped without a line saying how") == 1
    assert (
        "WARNING the command before this one here (drift-ray run, pid 4242 on node-7) stopped without a line saying "
        "how: it was killed (SIGKILL, out of memory) or its machine stopped; what it finished is kept"
    ) in logged


def test_an_output_path_that_is_a_directory_is_one_line_and_leaves_nothing_behind(tmp_path, capsys):
    authors = Path(__file__).parent / "fixtures" / "authors_sample.jsonl"
    taken = tmp_path / "weighted.parquet"
    taken.mkdir()
    assert main(["weights", "--input", str(authors), "--output", str(taken)]) == 2
    error = capsys.readouterr().err
    assert f"{taken}: the output names a directory; give a Parquet file's path, ending in .parquet" in error
    assert len(error.splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["weighted.parquet"]  # no weighted.diagnostics.json
    with pytest.raises(ValueError):  # where it came from, for a bug report
        main(["--traceback", "weights", "--input", str(authors), "--output", str(taken)])
    with pytest.raises(ValueError):  # after the command too
        main(["weights", "--input", str(authors), "--output", str(taken), "--traceback"])
    assert main(["weights", "--input", str(authors), "--output", str(taken)]) == 2  # and only where given


def test_a_run_dir_that_cannot_be_made_is_named_by_its_key(tmp_path, capsys, tiny_model_dir):
    (tmp_path / "a-file").write_text("")
    run_dir = tmp_path / "a-file" / "run"
    assert main(["rollouts", "--config", str(REPO / "jobs/smoke.yaml"), *smoke_overrides(run_dir, tiny_model_dir)]) == 2
    error = capsys.readouterr().err
    assert error == f"drift-ray rollouts: error: run_dir={run_dir}: cannot make the directory (Not a directory)\n"


def test_ctrl_c_is_one_line_that_says_how_to_go_on(tmp_path, capsys, tiny_model_dir):
    sigterm_handler = signal.getsignal(signal.SIGTERM)  # ray.init's, where an earlier test started Ray
    args = ["rollouts", "--config", str(REPO / "jobs/smoke.yaml"), f"run_dir={tmp_path / 'run'}", f"rollout.model={tiny_model_dir}"]
    with mock.patch("drift_ray.pipeline.run_rollouts", side_effect=KeyboardInterrupt):
        assert main(args) == 130
        error = capsys.readouterr().err
        assert error.startswith("drift-ray rollouts: interrupted; run the same command again to go on from what it finished")
        assert len(error.splitlines()) == 1
        assert main(["--traceback", *args]) == 130  # where it stopped, for a bug report, and still Ctrl-C's status
        error = capsys.readouterr().err
        assert error.startswith("Traceback (most recent call last):") and "KeyboardInterrupt" in error
        assert error.endswith("interrupted; run the same command again to go on from what it finished (rollout and "
                              "evaluation shards, training checkpoints, finished stages)\n")
    def terminated(*args):
        os.kill(os.getpid(), signal.SIGTERM)

    def terminated_while_ray_waits(*args):  # Ray's get turns what a signal handler raises into this
        try:
            terminated()
        except KeyboardInterrupt:
            raise KeyboardInterrupt from None

    for stage in (terminated, terminated_while_ray_waits):
        with mock.patch("drift_ray.pipeline.run_rollouts", side_effect=stage):
            assert main(args) == 128 + signal.SIGTERM
            assert capsys.readouterr().err.startswith("drift-ray rollouts: terminated; run the same command again")
            assert main(["--traceback", *args]) == 128 + signal.SIGTERM
            error = capsys.readouterr().err
            assert error.startswith("Traceback (most recent call last):") and "\ndrift-ray rollouts: terminated; " in error
            assert (tmp_path / "run" / RUN_LOG_FILE).read_text().endswith("ERROR ended: terminated; run the same command again to go on\n")
    with mock.patch("drift_ray.pipeline.run_rollouts", side_effect=KeyboardInterrupt):
        assert main(args) == 130  # not the SIGTERM of the run before
    assert (tmp_path / "run" / RUN_LOG_FILE).read_text().endswith("ERROR ended: interrupted; run the same command again to go on\n")
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler  # main's handler is main's alone


@pytest.mark.parametrize("signum, group, said", [(signal.SIGINT, True, "interrupted"), (signal.SIGTERM, False, "terminated")])
def test_a_signal_during_training_is_the_same_one_line_and_death_by_it(tmp_path, tiny_model_dir, signum, group, said):
    """Ray Train's own SIGINT handler aborts the run, which would end the command with status 1 and no
    word; a SIGTERM went to the handler ray.init puts in C, which prints a stack dump. Ctrl-C is sent to
    the process group, as a terminal's is (Ray's local cluster gets it too); SIGTERM to the command, as
    `kill` sends it."""
    weighted = tmp_path / "weighted.parquet"
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    pq.write_table(pa.table({schema.TRAJECTORY_ID: ["q/0"], schema.MESSAGES: [conversation], schema.WEIGHT: [1.0]}), weighted)
    command = [
        str(Path(sys.executable).with_name("drift-ray")), "train", "--config", str(REPO / "jobs/smoke.yaml"),
        "--input", str(weighted), *smoke_overrides(tmp_path / "run", tiny_model_dir),
        "train.epochs=100000", "train.checkpoint_every=0",  # one step per epoch: it trains until interrupted
    ]
    log = tmp_path / "train.log"
    with log.open("wb") as out:
        train = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while b"Started training worker group" not in log.read_bytes():
            assert train.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(1)
        (os.killpg if group else os.kill)(train.pid, signum)
        assert train.wait(timeout=120) == -signum, log.read_text()[-4000:]
    finally:
        if train.poll() is None:
            os.killpg(train.pid, signal.SIGKILL)
    text = log.read_text()
    assert f"drift-ray train: {said}; run the same command again to go on from what it finished" in text
    assert "SIGTERM received" not in text


def test_the_interrupted_command_dies_of_its_signal_so_that_a_shell_loop_around_it_stops():
    assert '\ndrift-ray = "drift_ray.cli:entry"\n' in (REPO / "pyproject.toml").read_text()
    for status, signum in (("INTERRUPTED", signal.SIGINT), ("TERMINATED", signal.SIGTERM)):
        interrupted = f"import drift_ray.cli as cli; cli.main = lambda: cli.{status}; cli.entry()"
        assert subprocess.run([sys.executable, "-c", interrupted], cwd=REPO).returncode == -signum
    failed = "import drift_ray.cli as cli; cli.main = lambda: 2; cli.entry()"
    assert subprocess.run([sys.executable, "-c", failed], cwd=REPO).returncode == 2


def test_flags_are_neither_abbreviated_nor_overridden_nor_left_empty(tmp_path, capsys, caplog):
    import ray

    weighted = tmp_path / "weighted.parquet"
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    pq.write_table(pa.table({schema.TRAJECTORY_ID: ["q/0"], schema.MESSAGES: [conversation], schema.WEIGHT: [1.0]}), weighted)
    train = ["train", "--config", str(REPO / "jobs/smoke.yaml"), "--input", str(weighted), f"run_dir={tmp_path / 'run'}"]
    with pytest.raises(SystemExit):  # abbreviated, --mode would be --model: a hub id named "uniform"
        main([*train, "--mode", "uniform"])
    assert "usage: drift-ray train " in (error := capsys.readouterr().err)  # the command's usage, not drift-ray's
    assert "drift-ray train: error: unrecognized arguments: --mode\n" in error
    # A flag given twice would keep its last value without a word.
    for twice in (["--input", "x"], ["--config", str(REPO / "jobs/demo_cpu.yaml")]):
        with pytest.raises(SystemExit):
            main([*train, *twice])
        assert f"drift-ray train: error: {twice[0]} given twice: give it once" in capsys.readouterr().err
    # An override given twice wins, as a script's `$BASE seed=2` means, and is told, as a slip is not meant.
    with caplog.at_level(logging.WARNING, logger="drift_ray"):
        assert main(["config", "seed=1", "seed=2", "train.lora.r=4", "train={lora: {r: 8}}", "train.lora.alpha=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["seed"], printed["train"]["lora"]["r"], printed["train"]["lora"]["alpha"]) == (2, 8, 4)
    assert "seed is overridden twice: the later value is used" in caplog.text
    assert "the override of train replaces the section in which earlier overrides set train.lora.r" in caplog.text
    assert "train.lora.alpha" not in caplog.text  # a key added to the section set before it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="drift_ray"):  # a key that the section set before it set
        assert main(["config", "train={lora: {r: 8}}", "train.lora.r=4"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["lora"]["r"] == 4
    assert "train.lora.r is overridden twice: the later value is used" in caplog.text
    with pytest.raises(SystemExit):
        main(["config", "--config", ""])  # Path("") would be the current directory
    assert "drift-ray config: error: argument --config: an empty path" in capsys.readouterr().err
    assert main([*train, "--model", ""]) == 2  # an unset $MODEL, say: not the config's model
    assert "the model is empty" in capsys.readouterr().err
    authors = Path(__file__).parent / "fixtures" / "authors_sample.jsonl"
    weights = ["weights", "--input", str(authors), "--output", str(tmp_path / "w.parquet")]
    assert main([*weights, "--beta", "0.5", "weights.beta=2"]) == 2  # the override would win unseen
    assert "--beta and the override 'weights.beta=2' both set weights.beta; give one of them" in capsys.readouterr().err
    assert main([*weights, "--gamma", "0.5", "weights={beta: 2}"]) == 2  # the whole section, --gamma included
    assert "--gamma and the override 'weights={beta: 2}' both set weights.gamma" in capsys.readouterr().err
    assert main([*weights, "--beta", "0"]) == 2  # named by the flag the user gave, not as an override
    assert "  weights.beta: Input should be greater than 0 (found 0.0) [set by --beta]" in capsys.readouterr().err.splitlines()
    assert main(["config", "seed=3", "--config", str(REPO / "jobs/smoke.yaml"), "run_dir=elsewhere"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)  # overrides on both sides of a flag
    assert (printed["seed"], printed["run_dir"]) == (3, "elsewhere")
    with pytest.raises(SystemExit):
        main(["config", "seed=3", "--config", str(REPO / "jobs/smoke.yaml"), "--seed", "4"])
    assert "unrecognized arguments: --seed" in capsys.readouterr().err
    # What follows a flag without being one is an override, refused as such, and what may be a secret is not shown.
    config = ["config", "seed=3", "--config", str(REPO / "jobs/smoke.yaml")]
    assert main([*config, "https://me:s3cr3t@llm.example/v1"]) == 2
    assert "an override has no '=' (not shown" in (error := capsys.readouterr().err) and "s3cr3t" not in error
    assert main([*config, "s3cr3t", "s3cr3t"]) == 2  # not named as an override given twice
    assert "an override has no '=' (not shown" in (error := capsys.readouterr().err) and "s3cr3t" not in error
    with pytest.raises(SystemExit):
        main([*config, "--api-key=s3cr3t"])
    assert "unrecognized arguments: --api-key=…" in (error := capsys.readouterr().err) and "s3cr3t" not in error
    assert main(["config", "--doc", "weights.bta=1"]) == 2  # the typo would go unnoticed
    assert "--doc documents every field and reads no config" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weighted.parquet"] and not ray.is_initialized()


def test_a_stage_of_its_own_warns_that_it_reads_no_rounds(tmp_path, caplog):
    authors = Path(__file__).parent / "fixtures" / "authors_sample.jsonl"
    with caplog.at_level(logging.WARNING, logger="drift_ray"):
        assert main(["weights", "--input", str(authors), "--output", str(tmp_path / "w.parquet"), "rounds=2"]) == 0
    assert "rounds=2: drift-ray weights is one stage of round 1 and reads no rounds; `drift-ray run` plays them all" in caplog.text


@pytest.mark.parametrize("unbuffered", ["1", None])
@pytest.mark.parametrize("command", [["config", "--doc"], ["config"]], ids=["14-kB", "3-kB"])
def test_a_reader_that_closes_the_output_early_is_no_error(command, unbuffered):
    # `drift-ray config --doc | head -1`: the reader goes away; the command ends as other tools do, of SIGPIPE,
    # whether it writes as it goes or, buffered, more than a buffer (8 kB), or all at its end.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    run = subprocess.Popen([sys.executable, "-m", "drift_ray", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    run.stdout.close()  # before the command, still importing, writes: all of it would fit the pipe
    assert run.wait(timeout=60) == -signal.SIGPIPE
    assert run.stderr.read() == b""


def test_the_model_to_train_is_checked_even_where_a_server_plays_the_rollouts(tmp_path, capsys):
    import ray

    weighted = tmp_path / "weighted.parquet"
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    pq.write_table(pa.table({schema.TRAJECTORY_ID: ["q/0"], schema.MESSAGES: [conversation], schema.WEIGHT: [1.0]}), weighted)
    train = ["train", "--config", str(REPO / "jobs/smoke.yaml"), "--input", str(weighted), f"run_dir={tmp_path / 'run'}"]
    served = ["rollout.engine=openai", "rollout.model=served-name"]
    assert main([*train, *served]) == 2
    assert "rollout.model 'served-name' names the server's model; give the model to train with --model" in capsys.readouterr().err
    assert main([*train, *served, "--model", "runs/a/train/modle"]) == 2  # mistyped: not left to the workers
    assert "runs/a/train/modle: no such model directory" in capsys.readouterr().err
    cfg = load_config(None, served)
    assert resolve_model("runs/a/train/modle", cfg) == "runs/a/train/modle"  # a name the server checks
    assert not ray.is_initialized()


def test_a_model_path_from_the_home_directory_is_expanded(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("HOME", str(Path(tiny_model_dir).parent))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}"])
    assert resolve_model(f"~/{Path(tiny_model_dir).name}", cfg) == tiny_model_dir


def test_a_model_path_that_starts_like_a_label_is_a_path(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "lr=1e-5" / "model")
    args = ["eval", "--config", str(REPO / "jobs/smoke.yaml"), f"run_dir={tmp_path / 'run'}"]
    # Labelled by its directory's name, as any path: not the model "1e-5/model" labelled "lr".
    assert main([*args, "--model", "lr=1e-5/model", "--model", f"model={tiny_model_dir}"]) == 2
    assert f"--model: two models labelled 'model'; label each, e.g. --model model-2={tiny_model_dir}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mistyped", ["runs/a/train/modle", "runs/lr=1e-5/train/modle"])
def test_a_mistyped_model_path_fails_before_ray_starts(tmp_path, capsys, monkeypatch, tiny_model_dir, mistyped):
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--config", str(REPO / "jobs/smoke.yaml"), f"run_dir={tmp_path / 'run'}"]
    assert main([*args, "--model", mistyped]) == 2  # the "=" of a path is no label
    assert f"{mistyped}: no such model directory, nor a Hub id ('name' or 'namespace/name')\n" in capsys.readouterr().err
    # Where the model it was meant for is there, it is named.
    meant = str(Path(mistyped).with_name("model"))
    shutil.copytree(tiny_model_dir, meant)
    assert main([*args, "--model", mistyped]) == 2
    assert f"{mistyped}: no such model directory, nor a Hub id ('name' or 'namespace/name'); did you mean {meant}?\n" in capsys.readouterr().err
    assert main([*args, "--model", f"{mistyped}/"]) == 2  # as a shell completes a directory
    assert f"did you mean {meant}?\n" in capsys.readouterr().err
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # else an absolute path is left to the cluster's workers
    assert main([*args, "--model", str(tmp_path / mistyped)]) == 2  # absolute
    assert f"{tmp_path / mistyped}: no such model directory; did you mean {tmp_path / meant}?\n" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["run", "rollouts", "eval"])
def test_a_mistyped_model_path_is_reported_before_the_task_loads(tmp_path, capsys, command):
    """A Hub task's first load is a download, which a mistyped model must not wait for."""
    args = [command, "--config", str(REPO / "jobs/smoke.yaml"), f"run_dir={tmp_path / 'run'}"]
    model = ["--model", "runs/a/train/modle"] if command == "eval" else ["rollout.model=runs/a/train/modle"]
    never = mock.Mock(side_effect=AssertionError("the task was loaded"))
    with mock.patch("drift_ray.prompts.load_task", never), mock.patch("drift_ray.pipeline.load_task", never):
        assert main([*args, *model]) == 2
    assert "runs/a/train/modle: no such model directory, nor a Hub id" in capsys.readouterr().err
    never.assert_not_called()


def test_a_missing_absolute_model_path_fails_before_a_cluster_of_the_command_s_own_starts(tmp_path, capsys, monkeypatch):
    import ray

    missing = str(tmp_path / "nope" / "model")
    args = ["rollouts", "--config", str(REPO / "jobs/smoke.yaml"), f"run_dir={tmp_path / 'run'}"]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main([*args, f"rollout.model={missing}"]) == 2
    assert f"{missing}: no such model directory\n" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "run").exists()
    # A cluster's workers may hold it on a shared volume that this machine lacks.
    for joined in (["ray.address=auto"], []):
        if not joined:
            monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
        assert resolve_model(missing, load_config(None, joined)) == missing
    assert resolve_model("/model", load_config(None, [])) == "/model"  # RAY_ADDRESS still set
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ValueError, match="^/model: no such model directory$"):
        resolve_model("/model", load_config(None, []))  # one slash, yet no Hub id


def test_a_hub_model_is_looked_up_in_the_hub_s_cache_before_ray_starts(tmp_path, capsys, caplog, monkeypatch, tiny_model_dir):
    """Offline, as this project's tests run: a model id the cache lacks fails in a line; one it holds (a full
    model, or a LoRA adapter) is taken, to be loaded by the actors and workers from that cache."""
    import ray
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    commit = "0" * 40
    for repo, record in (("drift-ray/tiny", "config.json"), ("drift-ray/tiny-adapter", "adapter_config.json")):
        cached = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        (cached / "refs").mkdir(parents=True)
        (cached / "refs" / "main").write_text(commit)
        (cached / "snapshots" / commit).mkdir(parents=True)
        shutil.copy(Path(tiny_model_dir) / "config.json", cached / "snapshots" / commit / record)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}"])
    assert resolve_model("drift-ray/tiny", cfg) == "drift-ray/tiny"
    assert resolve_model("drift-ray/tiny-adapter", cfg) == "drift-ray/tiny-adapter"
    with pytest.raises(ValueError, match="^drift-ray/tiny-adapter: a LoRA adapter .* weighted SFT cannot train further; train its base model, or"):
        resolve_model("drift-ray/tiny-adapter", cfg, to_train=True)  # its record names no base

    args = ["rollouts", "--config", str(REPO / "jobs/smoke.yaml"), f"run_dir={tmp_path / 'run'}"]
    assert main([*args, "rollout.model=someone/not-cached"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("drift-ray rollouts: error: someone/not-cached: no such local directory, and the Hugging Face Hub is out of reach")
    assert "HF_HUB_OFFLINE=1 then uses it without trying the network" in error and len(error.splitlines()) == 1
    assert not ray.is_initialized() and not (tmp_path / "run").exists()
    # On a cluster the command joins, the workers may reach the Hub, or hold the model in their caches.
    with caplog.at_level(logging.WARNING, logger="drift_ray.pipeline"):
        assert resolve_model("someone/not-cached", load_config(None, ["ray.address=auto"])) == "someone/not-cached"
    assert "someone/not-cached: no such local directory, and the Hugging Face Hub is out of reach" in caplog.text
    assert "left to the cluster's workers" in caplog.text

    # A mistyped local model that reads as a Hub id is one the Hub lacks too: the models here named like it are
    # suggested, a run directory's by the model it holds.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "runs" / "model")
    shutil.copytree(tiny_model_dir, tmp_path / "runs" / "demo" / "train" / "model")
    (tmp_path / "runs" / "models").mkdir()  # named alike, but no model
    for mistyped, meant in (("runs/modle", "runs/model"), ("runs/dmeo", "runs/demo/train/model"),
                            ("rnus", "runs/model"), ("gpt2", None), ("someone/modle", None)):
        with pytest.raises(ValueError, match="Hugging Face Hub is out of reach") as refused:
            resolve_model(mistyped, cfg)
        assert str(refused.value).endswith(f"; did you mean {meant}?" if meant else "without trying the network)")


def test_a_directory_that_holds_no_model_fails_before_ray_starts_and_points_to_the_model_below_it(tmp_path, capsys, tiny_model_dir):
    run_dir = tmp_path / "theirs"
    shutil.copytree(tiny_model_dir, run_dir / "train" / "model")
    args = ["eval", "--config", str(REPO / "jobs/smoke.yaml"), f"run_dir={tmp_path / 'run'}"]
    assert main([*args, "--model", f"drift={run_dir / 'train'}"]) == 2
    assert (
        f"{run_dir / 'train'}: not a model directory (no config.json, nor a LoRA adapter's adapter_config.json); "
        f"did you mean {run_dir / 'train' / 'model'}?"
    ) in capsys.readouterr().err
    # The run directory itself: its config.json is drift-ray's, not a model's.
    (run_dir / "config.json").write_text(json.dumps(load_config(None).model_dump(mode="json")))
    (run_dir / "run.json").write_text("{}")
    assert main([*args, "--model", f"drift={run_dir}"]) == 2
    assert (
        f"{run_dir}: not a model directory (its config.json names no model_type or architectures, as a drift-ray "
        f"run's does); did you mean {run_dir / 'train' / 'model'}?"
    ) in capsys.readouterr().err
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_model_dir, weightless, ignore=shutil.ignore_patterns("*.safetensors"))
    assert main([*args, "--model", f"drift={weightless}"]) == 2
    assert f"{weightless}: not a model directory (no weights: no *.safetensors, *.bin, *.pt, *.pth file)" in capsys.readouterr().err
    assert main([*args, "--model", f"drift={run_dir / 'run.json'}"]) == 2
    assert f"{run_dir / 'run.json'}: not a model directory (a file)" in capsys.readouterr().err
    assert main([*args, "--model", "drift="]) == 2
    assert "--model drift=: no model after the label; give LABEL=PATH" in capsys.readouterr().err
    # Without tokenizer files transformers builds an empty tokenizer: every prompt would be no tokens.
    untokenized = tmp_path / "untokenized"
    shutil.copytree(tiny_model_dir, untokenized, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    assert main([*args, "--model", f"drift={untokenized}"]) == 2
    assert f"{untokenized}: its tokenizer encodes text as no tokens: the directory holds no tokenizer files" in capsys.readouterr().err
    templateless = tmp_path / "templateless"
    shutil.copytree(tiny_model_dir, templateless, ignore=shutil.ignore_patterns("chat_template*"))
    assert main([*args, "--model", f"drift={templateless}"]) == 2
    assert f"{templateless}: its tokenizer has no chat template, which the conversations are written with" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_unmerged_lora_adapter_is_refused_for_training_before_any_stage(tmp_path, capsys, tiny_model_dir):
    """transformers loads an adapter frozen onto its base: the training workers found nothing to train, after
    the rollouts and weights. It still plays rollouts and is evaluated."""
    import ray

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": tiny_model_dir}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    refused = (f"{adapter}: a LoRA adapter (its adapter_config.json), which weighted SFT cannot train further; train its "
               f"base model ({tiny_model_dir}), or save the model merged (train.lora.merge=true, the default) to train it further\n")
    weighted = tmp_path / "weighted.parquet"
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    pq.write_table(pa.table({schema.TRAJECTORY_ID: ["q/0"], schema.MESSAGES: [conversation], schema.WEIGHT: [1.0]}), weighted)
    smoke = ["--config", str(REPO / "jobs/smoke.yaml"), f"run_dir={tmp_path / 'run'}"]
    assert main(["train", *smoke, "--input", str(weighted), "--model", str(adapter)]) == 2
    assert capsys.readouterr().err == f"drift-ray train: error: {refused}"
    assert not (tmp_path / "run").exists()
    assert main(["run", *smoke, f"rollout.model={adapter}"]) == 2
    assert capsys.readouterr().err == f"drift-ray run: error: {refused}"
    assert not ray.is_initialized() and not (tmp_path / "run" / "rollouts").exists()
    assert resolve_model(str(adapter), load_config(None, [])) == str(adapter)  # to play or evaluate


def test_lora_target_modules_that_match_nothing_are_refused_before_any_stage(tmp_path, capsys, tiny_model_dir):
    """Else every training worker failed with peft's error, after the rollouts and weights."""
    import ray

    run = ["run", "--config", str(REPO / "jobs/smoke.yaml"), *smoke_overrides(tmp_path / "run", tiny_model_dir),
           "train.lora.enabled=true", "train.lora.target_modules=[c_attn]"]
    assert main(run) == 2
    error = capsys.readouterr().err
    assert error.startswith("drift-ray run: error: train.lora.target_modules: Target modules {'c_attn'} not found in the base model")
    assert error.endswith(f"The linear modules of {tiny_model_dir}: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, "
                          "up_proj, v_proj\n")
    assert not ray.is_initialized() and not (tmp_path / "run" / "rollouts").exists()
    lora = load_config(None, ["train.lora.enabled=true", "train.lora.target_modules=[q_proj, v_proj]"])
    assert resolve_model(tiny_model_dir, lora, to_train=True) == tiny_model_dir
    unmatched = load_config(None, ["train.lora.enabled=true", "train.lora.target_modules=[c_attn]"])
    assert resolve_model(tiny_model_dir, unmatched) == tiny_model_dir  # to play or evaluate: no LoRA


def test_train_names_input_without_its_columns_before_starting_ray(tmp_path, capsys):
    import ray

    rollouts = tmp_path / "rollouts.parquet"  # the rollouts, not the weights written from them
    pq.write_table(pa.table({schema.TRAJECTORY_ID: ["p/0"], schema.MESSAGES: [[{"role": "assistant", "content": "a"}]]}), rollouts)
    args = ["train", "--config", str(REPO / "jobs/smoke.yaml"), "--input", str(rollouts), f"run_dir={tmp_path / 'run'}"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert f"{rollouts}: the weighted SFT stage needs column(s) ['weight']" in error
    assert "Weigh the trajectories with `drift-ray weights` first" in error
    assert not ray.is_initialized()
    # Weights without ids, as an earlier `drift-ray weights` wrote them from Parquet without: weighed again, they
    # have them.
    unweighed = tmp_path / "no_ids.parquet"
    rows = read_trajectories(Path(__file__).parent / "fixtures" / "authors_sample.jsonl").to_pylist()
    pq.write_table(pa.Table.from_pylist(rows).drop_columns([schema.TRAJECTORY_ID, schema.SAMPLE_INDEX, schema.SOURCE_LINE]), unweighed)
    weighted = tmp_path / "weighted.parquet"
    pq.write_table(pa.Table.from_pylist(rows).drop_columns([schema.TRAJECTORY_ID]).append_column(
        schema.WEIGHT, pa.array([1.0] * len(rows))), weighted)
    assert main([*args[:3], "--input", str(weighted), *args[5:]]) == 2
    error = capsys.readouterr().err
    assert f"{weighted}: the weighted SFT stage needs column(s) ['trajectory_id']" in error
    assert "Weigh the trajectories again with `drift-ray weights`, which gives those without ids theirs" in error
    pq.write_table(pa.table({schema.TRAJECTORY_ID: ["p/0"], schema.WEIGHT: [1.0]}), weighted)
    assert main([*args[:3], "--input", str(weighted), *args[5:]]) == 2
    assert "needs column(s) ['messages']" in (error := capsys.readouterr().err) and "give the trajectories theirs" in error
    assert main(["weights", "--input", str(unweighed), "--output", str(weighted)]) == 0
    assert pq.read_table(weighted).column(schema.TRAJECTORY_ID).to_pylist() == [row[schema.TRAJECTORY_ID] for row in rows]
    require_training_input(str(weighted))
    assert not ray.is_initialized()


def test_train_names_a_missing_input_before_building_the_model_or_starting_ray(tmp_path, capsys):
    import ray

    missing = tmp_path / "weighted.parquet"
    args = ["train", "--config", str(REPO / "jobs/smoke.yaml"), "--input", str(missing), f"run_dir={tmp_path / 'run'}"]
    with mock.patch("drift_ray.pipeline.resolve_model", side_effect=AssertionError("the model was resolved")):
        assert main(args) == 2
    assert f"{missing}: no such file or directory; weighted SFT reads the Parquet" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_a_mistake_in_eval_task_fails_before_the_rollouts(tmp_path, tiny_model_dir, capsys):
    run_dir = tmp_path / "run"
    args = ["run", "--config", str(REPO / "jobs/smoke.yaml"), *smoke_overrides(run_dir, tiny_model_dir)]
    assert main([*args, "eval.task.name=candidats"]) == 2
    assert "eval.task.name: unknown builtin task 'candidats'" in capsys.readouterr().err
    assert not (run_dir / "rollouts").exists()


def test_run_refuses_a_served_policy_whose_trained_model_no_server_serves(tmp_path, tiny_model_dir, capsys):
    run_dir = tmp_path / "run"
    args = ["run", "--config", str(REPO / "jobs/smoke.yaml"), *smoke_overrides(run_dir, tiny_model_dir)]
    assert main([*args, "rollout.engine=openai", "rollout.api_base=http://127.0.0.1:9/v1"]) == 2
    assert "rollout.engine=openai: drift-ray run evaluates the model it trains" in capsys.readouterr().err
    assert not run_dir.exists()


def test_the_demo_model_is_no_server_s_model_name(tmp_path, capsys, monkeypatch):
    """Before, the demo model was built (minutes, on an empty cache) and its path sent to the server."""
    import ray

    monkeypatch.setenv("DRIFT_RAY_CACHE", str(tmp_path / "cache"))
    args = ["rollouts", "--config", str(REPO / "jobs/smoke.yaml"), f"run_dir={tmp_path / 'run'}", "rollout.engine=openai"]
    assert main(args) == 2
    assert "rollout.model: builtin:demo is built for the local engines; with rollout.engine=openai give the name" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists() and not ray.is_initialized()


def test_a_server_that_fails_the_rollouts_is_told_in_one_line_and_what_it_played_is_kept(tmp_path, capsys):
    from aiohttp import web

    from tests.test_openai_engine import FakeServer, choice, completion

    served = []  # the question of the first problem asked: its batch is played, the others' refused

    async def refuses_after_the_first_batch(body, headers):
        question = next(m["content"] for m in body["messages"] if m["role"] == "user")
        served[:] = served or [question]
        if question != served[0]:
            return web.json_response({"error": "invalid api key"}, status=401)
        return completion(*[choice("<answer>4</answer>")] * body.get("n", 1))

    run_dir = tmp_path / "run"
    with FakeServer(refuses_after_the_first_batch) as server:
        args = ["rollouts", "--config", str(REPO / "jobs/smoke.yaml"), f"run_dir={run_dir}", "rollout.engine=openai",
                "rollout.model=served-name", f"rollout.api_base={server.api_base}", "rollout.samples_per_prompt=2",
                "rollout.prompts_per_batch=1", "task.num_train=3", "rollout.api_key_env=DRIFT_TEST_KEY_THAT_IS_NOT_SET"]
        assert main(args) == 2
    error = capsys.readouterr().err
    assert "UDF failed" not in error and "RayTaskError" not in error  # no actor crashed
    last = error.splitlines()[-1]  # above it, Ray Data's progress lines
    assert last.startswith(f"drift-ray rollouts: error: {server.api_base}/chat/completions answered HTTP 401")
    assert "2 of the 3 problems were not played; those played are kept in" in last and "a rerun plays the rest" in last
    assert len(list((run_dir / "rollouts").glob("part-*.parquet"))) == 1


@pytest.mark.parametrize(
    "split_given, refusal",
    [
        ("test", "has no training problems; give it a train split: task.train_path (a file task's, or a hub task's given task.test_path"),
        ("train", "has no test problems to evaluate on; give it a test split: task.test_path (a file task's, or a hub task's given task.train_path"),
    ],
)
def test_a_task_without_the_split_a_run_needs_fails_before_ray_starts(tmp_path, tiny_model_dir, capsys, split_given, refusal):
    import ray

    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"question": "x is between 10 and 29 and ends in 3. What is x?", "gold": "13"}\n')
    run_dir = tmp_path / "run"
    args = ["run", "--config", str(REPO / "jobs/smoke.yaml"), *smoke_overrides(run_dir, tiny_model_dir)]
    task = ["task.kind=file", "task.name=mine", "task.options={}", f"task.{split_given}_path={problems}"]
    assert main([*args, *task]) == 2
    assert f"task 'mine' {refusal}" in capsys.readouterr().err
    assert not (run_dir / "rollouts").exists() and not ray.is_initialized()


def test_an_evaluation_task_without_a_test_split_is_named_by_its_own_keys(tmp_path):
    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"question": "x is between 10 and 29 and ends in 3. What is x?", "gold": "13"}\n')
    cfg = load_config(None, [f"eval.task={{kind: file, name: mine, options: {{}}, train_path: {problems}}}"])
    with pytest.raises(ValueError) as refusal:
        evaluation_task(cfg)
    assert "give it a test split: eval.task.test_path (a file task's, or a hub task's given eval.task.train_path" in str(refusal.value)
    assert "or set eval.task" not in str(refusal.value)  # it is set
    # A plugin's remedy is its own: it has no paths to give.
    cfg = load_config(None, ["eval.task={kind: plugin, name: 'tests.test_prompts:make_plugin_task'}"])
    with pytest.raises(ValueError, match=re.escape(
        "task 'plugin' has no test problems to evaluate on; its plugin (eval.task.name) made none; give "
        "eval.task.options that make some"
    )):
        evaluation_task(cfg)


def test_the_rollouts_read_the_training_split_alone_where_no_evaluation_follows(tmp_path, caplog):
    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"question": "x is between 10 and 29 and ends in 3. What is x?", "gold": "13"}\n')
    task = f"task={{kind: file, train_path: {problems}, test_path: {tmp_path / 'gone.jsonl'}, num_test: 8}}"
    with caplog.at_level(logging.WARNING, logger="drift_ray"):
        trained = training_task(load_config(None, [task]), evaluated=False)
    assert (len(trained.train), trained.test) == (1, [])
    assert "num_test" not in caplog.text  # a test split it does not read is not warned of
    # Named by its training file, by `eval` (which reads the test file alone) as by `run`, and from the config a
    # run writes (task.name's default in it) too.
    test_file = tmp_path / "test.jsonl"
    test_file.write_text(problems.read_text())
    both = load_config(None, [f"task={{kind: file, train_path: {problems}, test_path: {test_file}}}"])
    for cfg in (both, validate_config(both.model_dump(mode="json"))):
        assert training_task(cfg, evaluated=False).name == evaluation_task(cfg).name == str(problems)
    # A run that evaluates on the task reads both.
    with pytest.raises(TaskError, match="gone.jsonl: no such file"):
        training_task(load_config(None, [task]), evaluated=True)


def test_a_config_the_local_cluster_cannot_run_fails_before_the_rollouts(tmp_path, tiny_model_dir, capsys):
    """A local cluster never grows: without the check, Ray Data waits forever for an actor that asks for a
    resource the cluster lacks (a GPU on a machine without one, or as here, what no machine has)."""
    import ray

    run_dir = tmp_path / "run"
    args = ["run", "--config", str(REPO / "jobs/smoke.yaml"), *smoke_overrides(run_dir, tiny_model_dir)]
    assert main([*args, "rollout.resources={no_such_node_type: 1}", "train.cpus_per_worker=1000"]) == 2
    err = capsys.readouterr().err
    assert "the local Ray cluster cannot run this config, and it does not grow:" in err
    assert "one rollout or evaluation actor needs no_such_node_type 1 (rollout.resources.no_such_node_type)" in err
    assert "the training workers need CPU 1000 (train.cpus_per_worker=1000 × train.num_workers=1), the cluster has 2" in err
    assert not ray.is_initialized()
    assert not (run_dir / "rollouts").exists()


def submit_when_ready(client, entrypoint: str, runtime_env: dict | None = None, wait_s: float = 120.0) -> str:
    """Submit the job (by default with DeepSpeed on CPU); the head's job agent may still be starting ("No
    available agent"), so retry."""
    runtime_env = runtime_env or {"env_vars": {"DS_ACCELERATOR": "cpu"}}
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def finished_job(client, job: str, wait_s: float):
    """The job's status once it has ended (or when `wait_s` ran out), and its logs."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + wait_s
    status = client.get_job_status(job)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job)
    return status, client.get_job_logs(job)


HEAD_NODE_CPUS = 2


@pytest.fixture(scope="module")
def head_node_dashboard(tmp_path_factory):
    """A `ray start --head` cluster of HEAD_NODE_CPUS on this machine, as on a cluster's head node; yields
    its dashboard address."""
    ray_bin = Path(sys.executable).with_name("ray")
    # The dashboard agent's port too: its default, 52365, is one the system may hand out for the others, and
    # Ray refuses two components on one port.
    gcs_port, dashboard_port, agent_port = free_ports(3)
    # Stopped at once: a node that gets SIGTERM first waits this long for its work to drain.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    # --block: stopped by ending this process, which takes its own node's processes with it. `ray stop`
    # would stop every Ray cluster of the user on the machine, a drift-ray run beside the tests included.
    log = tmp_path_factory.mktemp("head-node") / "ray_start.log"
    with log.open("wb") as out:
        head = subprocess.Popen(
            [str(ray_bin), "start", "--head", "--block", f"--num-cpus={HEAD_NODE_CPUS}", f"--port={gcs_port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
             f"--dashboard-agent-listen-port={agent_port}"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while b"will now block forever" not in log.read_bytes():
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        yield f"http://127.0.0.1:{dashboard_port}"
    finally:
        head.terminate()  # SIGTERM: the node stops its processes, then exits
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()  # its reaper process then stops the node's processes
            head.wait()
        # As `ray stop` does: else a later bare ray.init() would look for this cluster at the address that
        # Ray keeps of the last one started.
        address_file = Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or tempfile.gettempdir(), "ray", "ray_current_cluster")
        if address_file.exists() and address_file.read_text().strip().endswith(f":{gcs_port}"):
            address_file.unlink()


def test_ray_job_submit_to_a_head_node_runs_two_rounds_of_iterated_drift(
    tmp_path, tiny_model_dir, head_node_dashboard, caplog, capsys
):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head_node_dashboard)
    run_dir = tmp_path / "job_run"
    entrypoint = " ".join(
        [sys.executable, "-m", "drift_ray", "run", "--config", str(REPO / "jobs/smoke.yaml"),
         *smoke_overrides(run_dir, tiny_model_dir), "train.zero_stage=3", "rounds=2"]
    )
    status, logs = finished_job(client, submit_when_ready(client, entrypoint), wait_s=600)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "| drift " in logs and "| drift_round2 " in logs  # iterated DRIFT: both rounds evaluated
    assert f"iterated DRIFT: round 2 of 2, rollouts from {run_dir / 'train' / 'model'}" in logs  # which round is running
    assert (run_dir / "eval" / "eval.md").exists()
    assert (run_dir / "round-2" / "train" / "model" / "config.json").exists()
    # Round 2 collects its own rollouts, from the policy round 1 trained.
    from drift_ray.rollouts import read_shards

    round2 = read_shards(run_dir / "round-2" / "rollouts")
    assert set(round2.column(schema.MODEL).to_pylist()) == {str(run_dir / "train" / "model")}
    # Rerun with one round (everything finished: no Ray), its report leaves round 2 out, and says so.
    assert main(["run", "--config", str(REPO / "jobs/smoke.yaml"), *smoke_overrides(run_dir, tiny_model_dir),
                 "train.zero_stage=3", "rounds=1"]) == 0
    assert "| drift_round2 " not in capsys.readouterr().out
    assert (f"{run_dir} holds round(s) 2 of an earlier run with more rounds, which this one (rounds=1) neither continues "
            "nor evaluates: its run.json and evaluation report leave them out; rerun with rounds=2 to keep them") in caplog.text
    # Round 1's model gone, a rerun would train it anew: round 2, played from the old one, is named at once,
    # not refused one stage a rerun.
    shutil.rmtree(run_dir / "train")
    assert main(["run", "--config", str(REPO / "jobs/smoke.yaml"), *smoke_overrides(run_dir, tiny_model_dir),
                 "train.zero_stage=3", "rounds=2"]) == 2
    assert (f"{run_dir / 'train'}: round 1's model is to be trained anew, and {run_dir} holds round(s) 2 built on the "
            f"model it replaces: remove {run_dir / 'round-2'} to play round 2 and the rounds after it again (each builds on "
            "the model of the round before), or use a new run_dir") in capsys.readouterr().err
    assert not (run_dir / "train").exists()


def test_a_job_with_a_working_dir_is_warned_of_relative_outputs_that_go_with_it(tmp_path, head_node_dashboard):
    """Ray runs such a job in its copy of the working_dir: what it writes under a relative run_dir stays
    there, out of reach of a job submitted with other files, and Ray may delete it."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    working_dir = tmp_path / "working_dir"
    working_dir.mkdir()
    (working_dir / "lock.py").write_text(
        "import logging, sys\n"
        "from drift_ray.config import load_config\n"
        "from drift_ray.pipeline import lock_run_dir\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "with lock_run_dir(load_config(None, sys.argv[1:]), 'lock.py', writes_rollouts=True):\n"
        "    pass\n"
    )
    client = JobSubmissionClient(head_node_dashboard)
    absolute = tmp_path / "run"
    logs = {}
    for label, overrides in (("relative", "run_dir=runs/x rollout.output_dir=shared"), ("absolute", f"run_dir={absolute}")):
        job = submit_when_ready(client, f"{sys.executable} lock.py {overrides}", {"working_dir": str(working_dir)})
        status, logs[label] = finished_job(client, job, wait_s=120)
        assert status == JobStatus.SUCCEEDED, logs[label][-4000:]
    copy = re.search(r"run_dir=runs/x is relative to the directory this process runs in \((.+?)\), ", logs["relative"])
    assert copy and Path(copy.group(1)) != working_dir and (Path(copy.group(1)) / "lock.py").exists()
    assert (Path(copy.group(1)) / "runs" / "x" / RUN_LOCK_FILE).exists()  # written into Ray's copy
    assert "Give an absolute run_dir on storage that outlives the job" in logs["relative"]
    assert "rollout.output_dir=shared is relative" in logs["relative"]
    assert "is relative to the directory" not in logs["absolute"]
    assert (absolute / RUN_LOCK_FILE).exists()


class Marker:
    pass


def environment_variable(name: str) -> str | None:
    return os.environ.get(name)


def actors_named(name: str) -> list[str]:
    from ray.util.state import list_actors

    return [actor.name for actor in list_actors(filters=[("name", "=", name)])]


def test_beside_a_ray_start_cluster_only_ray_address_auto_joins_it(head_node_dashboard, caplog):
    """A config without ray.address, and every benchmark, start a cluster of their own size; a bare
    ray.init would join the one `ray start` runs on the machine (and refuse num_cpus)."""
    import ray

    from drift_ray.pipeline import connect_ray

    from tests.test_benchmarks import load_benchmark

    local_ray = load_benchmark("record.py").local_ray

    smoke = REPO / "jobs/smoke.yaml"
    own_cpus = HEAD_NODE_CPUS + 1
    connect_ray(load_config(smoke, [f"ray.num_cpus={own_cpus}"]), stages=())
    assert ray.cluster_resources()["CPU"] == own_cpus
    # Its tasks and actors ask its own State API, as Ray Train's placement-group cleaner does of the training's
    # controller: the one of the `ray start` cluster knows none of them (and the cleaner would remove the
    # placement group of a training that runs).
    marker = ray.remote(num_cpus=0)(Marker).options(name="drift-ray-own-cluster").remote()
    ray.get(marker.__ray_ready__.remote())
    assert ray.get(ray.remote(num_cpus=0)(actors_named).remote("drift-ray-own-cluster")) == ["drift-ray-own-cluster"]
    ray.shutdown()
    # The port chosen for its dashboard taken meanwhile (another command starting beside it): started again on
    # another, its processes ask its own dashboard, not the process that took the port.
    import drift_ray.pipeline

    free_port = drift_ray.pipeline._free_port
    with socket.socket() as taker:
        taker.bind(("127.0.0.1", 0))
        taker.listen()
        taken = taker.getsockname()[1]
        chosen = iter([taken])
        with mock.patch("drift_ray.pipeline._free_port", lambda preferred: next(chosen, None) or free_port(0)):
            connect_ray(load_config(smoke, [f"ray.num_cpus={own_cpus}"]), stages=())
        asked = ray.get(ray.remote(num_cpus=0)(environment_variable).remote("RAY_API_SERVER_ADDRESS"))
        assert asked.startswith("http://127.0.0.1:") and asked != f"http://127.0.0.1:{taken}"
        marker = ray.remote(num_cpus=0)(Marker).options(name="drift-ray-own-cluster").remote()
        ray.get(marker.__ray_ready__.remote())
        assert ray.get(ray.remote(num_cpus=0)(actors_named).remote("drift-ray-own-cluster")) == ["drift-ray-own-cluster"]
    ray.shutdown()
    with local_ray(num_cpus=own_cpus):
        assert ray.cluster_resources()["CPU"] == own_cpus
        marker = ray.remote(num_cpus=0)(Marker).options(name="drift-ray-own-cluster").remote()
        ray.get(marker.__ray_ready__.remote())
        assert ray.get(ray.remote(num_cpus=0)(actors_named).remote("drift-ray-own-cluster")) == ["drift-ray-own-cluster"]
    caplog.set_level(logging.INFO, logger="drift_ray")
    connect_ray(load_config(smoke, ["ray.address=auto"]), stages=())
    assert ray.cluster_resources()["CPU"] == HEAD_NODE_CPUS
    assert "ray.num_cpus=2 sizes only a cluster of this run's own, so it is not used" in caplog.text
