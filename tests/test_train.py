"""Tests of weighted SFT on Ray Train + DeepSpeed: the step plan, ZeRO-2/3 on CPU, invariance and resume.

The Ray tests train the untrained tiny Qwen2 of conftest (the demo's architecture and tokenizer) on 16 weighted
conversations (plus two of weight 0, which must be dropped). DeepSpeed runs on its CPU accelerator.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import drift_ray.train
from drift_ray import schema
from drift_ray.config import Config, ExampleKind, LoraConfig, LossKind, LrSchedule, TrainConfig, accumulation_steps
from drift_ray.train import (
    MODEL_DIR,
    PROGRESS_FILE,
    RUN_STORAGE_DIR,
    STATS_FILE,
    STEPS_FILE,
    TENSORBOARD_DIR,
    TENSORBOARD_SCALARS,
    _checkpoints_progress,
    _event_writer,
    _fit,
    _load_progress,
    _recorded_progress,
    _saved_steps,
    check_lora_targets,
    checkpoint_due,
    loads_partitioned,
    other_runs_left,
    plan_steps,
    read_stats,
    require_finite_step,
    run_name,
    starting_point,
    train_loop,
    train_settings,
    train_weighted_sft,
    unrecorded_checkpoints,
)
from drift_ray.trajectories import TRAIN_SETTINGS_FILE, write_json_atomic
from drift_ray.weighted_sft import per_sample_nll, tokenize_trajectory

NUM_POSITIVE = 16
NUM_ZERO = 2


def conversation(a: int, b: int, wrong_first: bool) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": f"What is {a}+{b}?"}]
    if wrong_first:
        messages += [
            {"role": "assistant", "content": f"<answer>{a + b + 1}</answer>"},
            {"role": "user", "content": "Incorrect. Please think again."},
        ]
    return messages + [{"role": "assistant", "content": f"<answer>{a + b}</answer>"}]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(NUM_POSITIVE + NUM_ZERO):
        a, b = (int(x) for x in rng.integers(0, 500, size=2))
        weight = 0.0 if i >= NUM_POSITIVE else float(rng.uniform(0.2, 3.0))
        wrong_first = i % 3 == 0
        rows.append(
            {
                schema.PROMPT_ID: f"p{i // 4}",
                schema.TRAJECTORY_ID: f"p{i // 4}/{i % 4}",
                schema.MESSAGES: conversation(a, b, wrong_first),
                # Every fourth last reply as if it had reached max_new_tokens; a first reply's flag not known.
                schema.CUT_OFF: [None] * wrong_first + [i % 4 == 1],
                schema.WEIGHT: weight,
                schema.RETURN: weight,
            }
        )
    return rows


@pytest.fixture(scope="module")
def weighted_dir(tmp_path_factory, rows) -> str:
    out = tmp_path_factory.mktemp("weighted")
    table = pa.Table.from_pylist(rows[::-1])  # reversed: the loop must not rely on the file order
    pq.write_table(table.slice(0, 9), out / "part-0.parquet")
    pq.write_table(table.slice(9), out / "part-1.parquet")
    return str(out)


@pytest.fixture(scope="module")
def model_path(tiny_model_dir) -> str:
    return tiny_model_dir


# The ray_cluster fixture's logical CPUs: two 1-CPU workers plus Ray Data's tasks must fit, even on a 2-core machine.
RAY_NUM_CPUS = 4


def test_a_killed_training_resumes_by_default_from_the_end_of_its_last_epoch():
    """Before, a run saved no checkpoint before its last step unless train.checkpoint_every was set: killed,
    it started again from step 0."""
    assert TrainConfig().checkpoint_every is None

    def due(every, epochs=3, examples=11, loss=LossKind.sample_mean):
        plan = plan_steps([1 + i % 4 for i in range(examples)], [1.0] * examples, global_batch_size=4,
                          micro_batch_size=2, world_size=1, epochs=epochs, seed=0, loss=loss)
        assert len(plan) == 3 * epochs  # 11 examples: batches of 4, 4 and 3
        return [step for step in range(1, len(plan) + 1) if checkpoint_due(plan, step, every)]

    for loss in LossKind:
        assert due(None, loss=loss) == [3, 6]  # at each epoch's end; the last step publishes the model instead
    assert due(None, epochs=1) == []
    assert due(4) == [4, 8] and due(1) == list(range(1, 9))
    assert due(0) == []  # none asked for


def test_checkpoints_saved_after_the_one_a_run_resumes_from_are_told(tmp_path):
    """Ray Train records a checkpoint a few seconds after it is saved: a run stopped in between resumes from an
    earlier one, and before, it said only where it resumed."""
    run = tmp_path / "run"
    for name, progress in [("a", {"step": 30}), ("b", {"step": 40}), ("c", {"finished": True, "step": 50}),
                           ("d", {"finished": True}), ("e", ["not a record"])]:  # d: as an earlier drift-ray wrote it
        (run / f"checkpoint_{name}").mkdir(parents=True)
        (run / f"checkpoint_{name}" / PROGRESS_FILE).write_text(json.dumps(progress))
    (run / "checkpoint_cut").mkdir()  # a copy cut short before its progress
    saved = _saved_steps(_checkpoints_progress(run))
    assert saved == [30, 40, 50]  # the final checkpoint's too: a whole training would go unsaid
    assert unrecorded_checkpoints(saved, 30) == (
        "the checkpoint(s) of step(s) 40, 50 were saved, but the run was stopped before Ray Train recorded them (it "
        "records one a few seconds after it is saved), so this run resumes after step 30 and trains those steps again"
    )
    assert "so this run starts again from step 0 and" in unrecorded_checkpoints([30], 0)
    assert unrecorded_checkpoints(saved, 50) is None and unrecorded_checkpoints([], 0) is None


def test_a_record_of_checkpoints_that_this_ray_cannot_read_is_no_resume_to_warn_of(tmp_path):
    """A Ray Train whose Result.from_path is not implemented tells nothing (None: no warning of retrained steps, which
    would be false); an I/O error is not given the remedy of removing the checkpoints."""
    import ray.train

    (tmp_path / "run").mkdir()
    with mock.patch.object(ray.train.Result, "from_path", side_effect=NotImplementedError("not implemented yet")):
        assert _recorded_progress(tmp_path / "run") is None
    with mock.patch.object(ray.train.Result, "from_path", side_effect=PermissionError(13, "Permission denied")):
        with pytest.raises(PermissionError):
            _recorded_progress(tmp_path / "run")
    assert _recorded_progress(tmp_path / "run") == {}  # no record: stopped before Ray Train recorded anything
    assert _recorded_progress(tmp_path / "absent") == {}
    # Said as the training starts: run_dir's log tells a training that starts again from one never started.
    assert starting_point({}, tmp_path / "run") == (
        f"training from step 0: the training in {tmp_path / 'run'} was stopped before it recorded a checkpoint"
    )
    assert starting_point({}, tmp_path / "absent") == "training from step 0"


def test_the_lora_check_leaves_a_model_it_cannot_build_to_the_workers(tmp_path, model_path):
    lora = make_config(lora=LoraConfig(enabled=True, target_modules=["c_attn"])).train
    with pytest.raises(ValueError, match=r"^train\.lora\.target_modules: Target modules \{'c_attn'\} not found"):
        check_lora_targets(lora, model_path)
    unknown = tmp_path / "unknown"
    shutil.copytree(model_path, unknown)
    (unknown / "config.json").write_text(json.dumps({**json.loads((unknown / "config.json").read_text()), "model_type": "not-a-model-type"}))
    check_lora_targets(lora, str(unknown))  # this transformers cannot build it: the workers' load tells
    check_lora_targets(lora, "someone/not-cached")  # nor read it: no wait for the Hub either
    check_lora_targets(make_config().train, str(unknown))  # no LoRA: nothing to check


def test_lora_on_every_linear_layer_adapts_the_mlp_too_but_not_the_output_layer(model_path):
    from transformers import AutoModelForCausalLM

    from drift_ray.train import _with_lora

    train = make_config(lora=LoraConfig(enabled=True, target_modules="all-linear")).train
    check_lora_targets(train, model_path)
    adapted = _with_lora(AutoModelForCausalLM.from_pretrained(model_path), train)
    names = {name.split(".lora_A")[0].rpartition(".")[2] for name, _ in adapted.named_parameters() if "lora_A" in name}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    assert not any("lm_head" in name and "lora" in name for name, _ in adapted.named_parameters())


def make_config(**train: object) -> Config:
    defaults = dict(
        num_workers=1,
        zero_stage=2,
        lr=5e-3,
        warmup_ratio=0.0,
        epochs=2,
        global_batch_size=8,
        micro_batch_size=2,
        weight_decay=0.0,
        max_length=64,
    )
    return Config(seed=3, train=TrainConfig(**{**defaults, **train}))


def step_metrics(out: str | Path) -> list[dict]:
    lines = (Path(out) / MODEL_DIR / STEPS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines]


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def parameters(path: str | Path) -> dict[str, torch.Tensor]:
    return weights_of(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))


# The schedule of the run that the resumed one is compared with: a resume must pick it up mid-way.
SCHEDULED = dict(warmup_ratio=0.25, lr_schedule=LrSchedule.cosine)
# zero2_run logs every step, which its checks of the step log and of TensorBoard read.
ZERO2 = dict(log_every=1, **SCHEDULED)


# --- The step plan (no Ray) ---


def test_plan_uses_every_example_once_per_epoch_in_identical_global_batches_for_any_world_size():
    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 200, size=37).tolist()
    weights = rng.uniform(0.0, 2.0, size=37).tolist()
    plans = {
        world: plan_steps(
            lengths, weights, global_batch_size=8, micro_batch_size=2, world_size=world, epochs=2, seed=5,
            loss=LossKind.weight_normalized,
        )
        for world in (1, 2, 4)
    }
    for world, plan in plans.items():
        assert len(plan) == 2 * 5  # ceil(37 / 8) per epoch
        for epoch in (0, 1):
            used = Counter(
                i
                for step in plan
                if step.epoch == epoch
                for rank in step.micro_batches
                for micro in rank
                if not micro.filler
                for i in micro.indices
            )
            assert used == Counter(range(37)), world
        for step in plan:
            assert len(step.micro_batches) == world
            assert {len(rank) for rank in step.micro_batches} == {accumulation_steps(8, 2, world)}
    for step_1, step_2, step_4 in zip(plans[1], plans[2], plans[4]):
        micro_1 = sorted(tuple(m.indices) for rank in step_1.micro_batches for m in rank if not m.filler)
        for other in (step_2, step_4):
            assert sorted(tuple(m.indices) for rank in other.micro_batches for m in rank if not m.filler) == micro_1
            assert other.normalizer == step_1.normalizer
        real = [i for indices in micro_1 for i in indices]
        assert step_1.normalizer == pytest.approx(sum(weights[i] for i in real))


def test_weight_normalized_batches_do_not_follow_length():
    # As in DRIFT's rollouts: failures play every turn (long) and weigh nearly 0 at beta 0.1, first-turn
    # successes are short and carry the weight.
    rng = np.random.default_rng(0)
    failed = rng.random(1800 * 16) < 0.5
    lengths = np.where(failed, rng.integers(2800, 3200, failed.size), rng.integers(500, 700, failed.size)).tolist()
    weights = np.where(failed, 2 * np.exp(-10.0), 2.0).tolist()

    def failures_share_of_the_loss(loss: LossKind) -> float:
        plan = plan_steps(
            lengths, weights, global_batch_size=128, micro_batch_size=8, world_size=1, epochs=1, seed=0, loss=loss
        )
        coefficient = np.zeros(failed.size)  # of an example's L_i in the loss of its step
        for step in plan:
            for micro in step.micro_batches[0]:
                if not micro.filler:
                    coefficient[micro.indices] = np.asarray(micro.weights) / step.normalizer
        return coefficient[failed].sum() / coefficient.sum()

    # Their share of the weight, as in a random batch; batches of long failures alone, each divided by
    # its own tiny sum of weights, would give them nearly half the loss.
    share_of_weight = np.sum(np.asarray(weights)[failed]) / np.sum(weights)
    assert failures_share_of_the_loss(LossKind.weight_normalized) == pytest.approx(share_of_weight, rel=0.05)
    assert failures_share_of_the_loss(LossKind.sample_mean) == pytest.approx(share_of_weight, rel=1e-6)


def test_plan_pads_a_partial_global_batch_with_weight_zero_fillers():
    plan = plan_steps(
        [5] * 10, [1.0] * 10, global_batch_size=8, micro_batch_size=2, world_size=2, epochs=1, seed=0,
        loss=LossKind.sample_mean,
    )
    last = next(step for step in plan if sum(not m.filler for rank in step.micro_batches for m in rank) == 1)
    assert last.normalizer == 2.0  # the two samples of the partial batch, not the nominal 8
    fillers = [m for rank in last.micro_batches for m in rank if m.filler]
    assert len(fillers) == 3 and all(m.weights == [0.0] for m in fillers)


def test_global_batch_that_does_not_split_evenly_names_the_config_keys():
    with pytest.raises(ValueError, match=r"train\.global_batch_size=12 .* 4 × 2 = 8"):
        accumulation_steps(12, 4, 2)


# --- Ray Train + DeepSpeed on CPU ---


class SignalledTrainer:
    """A trainer whose fit does what Ray Train's does when the process gets `signum` (SIGINT, or SIGTERM,
    which ray.init turns into SystemExit): installs a SIGINT handler of its own, which aborts the run, and
    ends with SystemExit (`finished=False`) or returns (the run finished before the abort)."""

    def __init__(self, signum: int | None, finished: bool = False):
        self.signum, self.finished = signum, finished

    def fit(self) -> str:
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        if self.signum is not None:
            os.kill(os.getpid(), self.signum)
        if not self.finished:
            raise SystemExit(1)
        return "result"


@pytest.fixture
def sys_exit_on_sigterm():
    before = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # as ray.init's
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("finished", [False, True], ids=["aborted", "finished-before-the-abort"])
def test_ctrl_c_during_fit_is_a_keyboard_interrupt_and_ray_s_handler_goes_with_fit(finished):
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _fit(SignalledTrainer(signal.SIGINT, finished))
    assert signal.getsignal(signal.SIGINT) is handler
    assert signal.set_wakeup_fd(-1) == -1  # put back too


def test_fit_ended_otherwise_ends_as_it_did(sys_exit_on_sigterm):
    with pytest.raises(SystemExit) as ended:
        _fit(SignalledTrainer(signal.SIGTERM))
    assert ended.value.code == signal.SIGTERM
    assert _fit(SignalledTrainer(None, finished=True)) == "result"


class Stopped(Exception):
    pass


def test_a_sigterm_during_fit_ends_as_its_handler_says():
    """Ray's get turns what a SIGTERM handler raises while it waits into a KeyboardInterrupt; or the run
    finishes first, and fit returns."""

    class Trainer(SignalledTrainer):
        def fit(self) -> str:
            try:
                return super().fit()
            except Stopped:
                if self.finished:
                    return "result"
                raise KeyboardInterrupt from None

    def stop(signum, frame):
        raise Stopped

    before = signal.signal(signal.SIGTERM, stop)
    try:
        for finished in (False, True):
            with pytest.raises(Stopped):
                _fit(Trainer(signal.SIGTERM, finished))
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.fixture(scope="module")
def zero2_run(ray_cluster, tmp_path_factory, weighted_dir, model_path):
    out = tmp_path_factory.mktemp("zero2")
    return out, train_weighted_sft(make_config(tensorboard=True, **ZERO2), weighted_dir, model_path, str(out))


@pytest.mark.ray
@pytest.mark.slow
def test_zero2_on_cpu_drops_zero_weights_lowers_the_loss_and_saves_a_loadable_model(zero2_run, model_path):
    out, stats = zero2_run
    # Ray Train's SIGINT handler, which fit installs, is gone with it: Ctrl-C in a later stage is not Ray's.
    assert "DataParallelTrainer" not in getattr(signal.getsignal(signal.SIGINT), "__qualname__", "")
    assert stats["examples"] == NUM_POSITIVE and stats["loaded_partitioned"] is False  # ZeRO-2 loads whole
    assert stats["steps"] == 2 * NUM_POSITIVE // 8 and stats["resumed_from_step"] == 0
    assert stats["final_loss"] < stats["initial_loss"]
    assert stats["tokens"] > 0 and stats["tokens_per_s"] > 0
    assert stats["truncated_examples"] == 0  # max_length 64 holds every conversation
    steps = step_metrics(out)
    assert [row["step"] for row in steps] == list(range(1, stats["steps"] + 1))
    assert [row["epoch"] for row in steps] == [0, 0, 1, 1]
    assert steps[0]["loss"] == stats["initial_loss"]
    assert np.mean([row["loss"] for row in steps[2:]]) == pytest.approx(stats["final_loss"])
    assert steps[-1]["tokens"] == stats["tokens"] and steps[-1]["grad_norm"] == stats["grad_norm"]
    assert all(a["tokens"] < b["tokens"] for a, b in zip(steps, steps[1:]))
    # The peak so far, in MiB (a worker with torch loaded holds more than 100), which the save may raise.
    peaks = [row["peak_rss_mb"] for row in steps]
    assert peaks == sorted(peaks) and 100 < peaks[0] and peaks[-1] <= stats["peak_rss_mb"]
    trained, initial = parameters(out / MODEL_DIR), parameters(model_path)
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[name], initial[name]) for name in trained)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(
    "weights, without_a_reply, cut_off, message",
    [
        ([1.0, float("nan"), -2.0], [], None, r"'weight' must be finite and >= 0; found nan at 'q/1', -2.0 at 'q/2'"),
        (["1", "x", "2"], [], None, r"column 'weight' holds string; expected numbers"),
        # Found before training, not at the row's step; q/1, with weight 0, is not trained on.
        (
            [1.0, 0.0, 1.0],
            [1, 2],
            None,
            r"conversations that weighted SFT cannot train on: 'q/2': no assistant message to train on \(roles \['user'\]\)$",
        ),
        (
            [1.0, 1.0, 1.0],
            [],
            [[False], [True, False], [True]],
            r"conversations that weighted SFT cannot train on: 'q/1': cut_off has 2 flags for 1 assistant message; expected one each$",
        ),
        ([1.0] * 3, [], [["no"]] * 3, r"column 'cut_off' holds list<element: string>; expected lists of booleans"),
    ],
    ids=["nan-and-negative", "strings", "no-reply", "cut-off-flags", "cut-off-strings"],
)
def test_bad_weights_and_conversations_are_refused_naming_the_file_and_trajectories(
    ray_cluster, tmp_path, model_path, weights, without_a_reply, cut_off, message
):
    conversations = [conversation(1, k, wrong_first=False) for k in range(3)]
    rows = {
        schema.TRAJECTORY_ID: [f"q/{k}" for k in range(3)],
        schema.MESSAGES: [c[:1] if k in without_a_reply else c for k, c in enumerate(conversations)],
        schema.WEIGHT: weights,
        **({schema.CUT_OFF: cut_off} if cut_off else {}),
    }
    weighted = tmp_path / "weighted"
    weighted.mkdir()
    pq.write_table(pa.table(rows), weighted / "part-0.parquet")
    with pytest.raises(ValueError, match=re.escape(str(weighted)) + ": " + message):
        train_weighted_sft(make_config(), str(weighted), model_path, str(tmp_path / "out"))
    assert not (tmp_path / "out" / MODEL_DIR).exists()


def test_damaged_training_records_are_named(tmp_path):
    # Cut short (a full disk, a killed copy): the JSON error named no file.
    model = tmp_path / "model"
    model.mkdir()
    (model / STATS_FILE).write_text('{"steps": 4, ')
    with pytest.raises(ValueError, match=re.escape(f"{model / STATS_FILE}: not valid JSON (Expecting")):
        read_stats(model)

    checkpoint_dir = tmp_path / "checkpoint"
    checkpoint_dir.mkdir()
    (checkpoint_dir / PROGRESS_FILE).write_text('"step"')
    checkpoint = mock.Mock(path=str(checkpoint_dir), as_directory=lambda: contextlib.nullcontext(str(checkpoint_dir)))
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint_dir / PROGRESS_FILE}: holds a JSON string, not an object; ")):
        _load_progress(checkpoint)


def no_ray_start() -> None:
    raise AssertionError("started Ray with nothing to train")


def test_a_finished_model_is_refused_when_its_weighted_file_was_rewritten(tmp_path, rows, model_path):
    """Reused or refused without starting Ray."""
    weighted = tmp_path / "weighted.parquet"
    pq.write_table(pa.Table.from_pylist(rows), weighted)
    out, cfg = tmp_path / "train", make_config()
    # A finished run, as train_weighted_sft leaves it.
    write_json_atomic(train_settings(cfg, str(weighted), model_path, out), out / MODEL_DIR / TRAIN_SETTINGS_FILE)
    write_json_atomic({"steps": 4}, out / MODEL_DIR / STATS_FILE)
    assert train_weighted_sft(cfg, str(weighted), model_path, str(out), start_ray=no_ray_start) == {"steps": 4}
    # The same model files elsewhere (the demo reference's cache, seen from a run_dir that moved).
    elsewhere = str(shutil.copytree(model_path, tmp_path / "elsewhere" / "model"))
    assert train_weighted_sft(cfg, str(weighted), elsewhere, str(out), start_ray=no_ray_start) == {"steps": 4}

    pq.write_table(pa.Table.from_pylist(rows[::-1]), weighted)  # the same weights in another order
    assert train_weighted_sft(cfg, str(weighted), model_path, str(out), start_ray=no_ray_start) == {"steps": 4}
    reweighted = [{**row, schema.WEIGHT: 2 * row[schema.WEIGHT]} for row in rows]  # `drift-ray weights`, another β
    pq.write_table(pa.Table.from_pylist(reweighted), weighted)
    with pytest.raises(RuntimeError, match=r"made with other settings \(differ in: weighted_fingerprint \(.*What it was "
                       r"made from changed since: remove .*model to make it again"):
        train_weighted_sft(cfg, str(weighted), model_path, str(out), start_ray=no_ray_start)
    # Another file of other weights (`drift-ray train --input`): the setting is said in the command's words.
    other = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist(reweighted), other)
    with pytest.raises(RuntimeError, match=r"differ in: weighted_dir \('\.\./weighted\.parquet' then, '\.\./other\.parquet' now\); .*"
                       r"weighted_dir: the weighted trajectories trained on \(`drift-ray train --input`; `run`'s own weights\)"):
        train_weighted_sft(cfg, str(other), model_path, str(out), start_ray=no_ray_start)
    # Other rollouts under the same ids and weights (uniform weights always give that): other conversations.
    replied_otherwise = [
        {**row, schema.MESSAGES: [*row[schema.MESSAGES][:-1], {"role": "assistant", "content": "<answer>0</answer>"}]}
        for row in rows
    ]
    pq.write_table(pa.Table.from_pylist(replied_otherwise), weighted)
    with pytest.raises(RuntimeError, match=r"made with other settings \(differ in: conversations_fingerprint \("):
        train_weighted_sft(cfg, str(weighted), model_path, str(out), start_ray=no_ray_start)
    # A record from before the conversations were fingerprinted lacks the setting, and is accepted.
    pq.write_table(pa.Table.from_pylist(rows), weighted)
    settings = train_settings(cfg, str(weighted), model_path, out)
    del settings["conversations_fingerprint"]
    write_json_atomic(settings, out / MODEL_DIR / TRAIN_SETTINGS_FILE)
    assert train_weighted_sft(cfg, str(weighted), model_path, str(out), start_ray=no_ray_start) == {"steps": 4}

    # Settings that only observe or place the run leave it the same run, also for a record that holds them.
    recorded = {**settings, "train": cfg.train.model_dump(mode="json")}
    write_json_atomic(recorded, out / MODEL_DIR / TRAIN_SETTINGS_FILE)
    placed_otherwise = make_config(tensorboard=True, log_every=1, checkpoint_every=2, resources={"trainer": 1.0})
    assert train_weighted_sft(placed_otherwise, str(weighted), model_path, str(out), start_ray=no_ray_start) == {"steps": 4}
    assert run_name(train_settings(placed_otherwise, str(weighted), model_path, out)) == run_name(
        train_settings(cfg, str(weighted), model_path, out)
    )
    with pytest.raises(RuntimeError, match=r"made with other settings \(differ in: train\.cpus_per_worker \(1\.0 then, 2\.0 now\)\)"):
        train_weighted_sft(make_config(cpus_per_worker=2.0), str(weighted), model_path, str(out), start_ray=no_ray_start)

    # With training to do, Ray starts first of all: a cluster that refuses the config leaves no output.
    shutil.rmtree(out)
    with pytest.raises(ValueError, match="no cluster here"):
        train_weighted_sft(cfg, str(weighted), model_path, str(out), start_ray=mock.Mock(side_effect=ValueError("no cluster here")))
    assert not out.exists()


@pytest.mark.ray
@pytest.mark.slow
def test_a_finished_run_is_not_trained_again(zero2_run, weighted_dir, model_path, tmp_path):
    out, stats = zero2_run
    # The same weighted rollouts at another path, in one file (as `drift-ray weights --output` writes them,
    # where `drift-ray run` writes run_dir/weighted/), are the same input.
    one_file = tmp_path / "weighted.parquet"
    pq.write_table(pq.read_table(weighted_dir), one_file)
    # Checkpoints that a run killed after publishing its model (or an older drift-ray) left: no use any more.
    (out / RUN_STORAGE_DIR / "weighted_sft-killed" / "checkpoint_0").mkdir(parents=True)
    # With train.tensorboard off: it only observed the run, which stays the same run.
    with mock.patch("ray.train.torch.TorchTrainer", side_effect=AssertionError("trained again")):
        for same_input in (weighted_dir, str(one_file)):
            assert train_weighted_sft(make_config(**ZERO2), same_input, model_path, str(out)) == stats
    assert not (out / RUN_STORAGE_DIR).exists()


@pytest.mark.ray
@pytest.mark.slow
def test_rank_0_logs_every_step_once_and_writes_it_to_tensorboard(ray_cluster, zero2_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = zero2_run
    steps = step_metrics(out)
    [run] = (out / TENSORBOARD_DIR).iterdir()  # one directory per run
    events = EventAccumulator(str(run))
    events.Reload()
    for name in TENSORBOARD_SCALARS:
        scalars = events.Scalars(f"train/{name}")
        assert [event.step for event in scalars] == [row["step"] for row in steps]
        assert [event.value for event in scalars] == pytest.approx([row[name] for row in steps], rel=1e-6)

    # Every worker's output, as Ray keeps it; other tests' runs log other metrics.
    assert [row for row in logged_steps(ray_cluster) if row in steps] == steps


def logged_steps(ray_cluster, since: dict[Path, int] | None = None) -> list[dict]:
    """The step metrics the training workers logged, as Ray keeps their output (`since`: see worker_output)."""
    lines = worker_output(ray_cluster, since).splitlines()
    return [json.loads(line.split("weighted SFT ", 1)[1]) for line in lines if "weighted SFT {" in line]


def worker_output(ray_cluster, since: dict[Path, int] | None = None) -> str:
    """What the workers wrote, as Ray keeps it (`since`: only what the log files gained after their sizes
    then, from worker_log_sizes)."""
    output = []
    for path in worker_logs(ray_cluster):
        with path.open("rb") as log_file:
            log_file.seek((since or {}).get(path, 0))
            output.append(log_file.read().decode(errors="replace"))
    return "\n".join(output)


def worker_log_sizes(ray_cluster) -> dict[Path, int]:
    return {path: path.stat().st_size for path in worker_logs(ray_cluster)}


def worker_logs(ray_cluster) -> list[Path]:
    return list(Path(ray_cluster._private.worker._global_node.get_logs_dir_path()).glob("worker-*"))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.extended  # ZeRO-3 on two workers is in the default run: test_lora_with_gradient_checkpointing_…
@pytest.mark.parametrize("stage, offload", [(3, False), (3, True), (0, False)], ids=["zero3", "zero3-offload", "zero0"])
def test_other_zero_stages_on_cpu_lower_the_loss_and_save_a_loadable_model(
    ray_cluster, tmp_path, weighted_dir, model_path, stage, offload
):
    """With offload, DeepSpeed's own CPU Adam replaces torch's AdamW (its first use compiles it, minutes).
    Without ZeRO, DeepSpeed steps torch's AdamW itself and reports no gradient norm: the loop measures it."""
    stats = train_weighted_sft(make_config(zero_stage=stage, offload=offload), weighted_dir, model_path, str(tmp_path))
    assert stats["final_loss"] < stats["initial_loss"]
    assert stats["grad_norm"] > 0
    trained, initial = parameters(tmp_path / MODEL_DIR), parameters(model_path)
    assert any(not torch.equal(trained[name], initial[name]) for name in trained)


def reference_update(
    model_path: str, rows: list[dict], max_length: int, lr: float, loss_kind: LossKind = LossKind.weight_normalized
) -> dict:
    """One plain AdamW step on Σ w_i·L_i / Σ w_i (weight_normalized) or / N (sample_mean) over all positive
    rows (the replies cut off at max_new_tokens without their end of turn), in one process: the loss, its
    gradient's norm, the weights after the step, and how many of the rows were cut to max_length."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)  # as the workers load it
    total = torch.zeros(())
    truncated = 0
    positive = [row for row in rows if row[schema.WEIGHT] > 0]
    for row in positive:
        messages, cut_off = row[schema.MESSAGES], row[schema.CUT_OFF]
        example = tokenize_trajectory(tokenizer, messages, ExampleKind.last_turn, max_length, cut_off)
        truncated += example.cut_tokens > 0
        logits = model(input_ids=torch.tensor([example.input_ids])).logits
        total = total + row[schema.WEIGHT] * per_sample_nll(logits, torch.tensor([example.labels]))[0]
    loss = total / (sum(row[schema.WEIGHT] for row in positive) if loss_kind is LossKind.weight_normalized else len(positive))
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0).step()  # the workers' optimizer
    return {"loss": loss.item(), "grad_norm": norm.item(), "weights": weights_of(model), "truncated": truncated}


@pytest.mark.ray
@pytest.mark.slow
# ZeRO-3 on two workers is in the default run too: test_lora_with_gradient_checkpointing_… saves a model
# gathered from both ranks.
@pytest.mark.parametrize(
    "stage, loss_kind, positive",
    [
        (0, LossKind.weight_normalized, NUM_POSITIVE),
        (2, LossKind.weight_normalized, NUM_POSITIVE),
        pytest.param(3, LossKind.weight_normalized, NUM_POSITIVE, marks=pytest.mark.extended),
        # 10 rows: three micro-batches of at most 4, so one worker runs a weight-0 filler beside its one.
        (2, LossKind.sample_mean, 10),
    ],
    ids=["zero0", "zero2", "zero3", "zero2-sample_mean-filler"],
)
def test_two_workers_make_the_update_of_one_plain_optimizer_step_over_the_global_batch(
    ray_cluster, tmp_path, weighted_dir, model_path, rows, stage, loss_kind, positive
):
    """Two workers of two accumulated micro-batches each (or one and a filler): the loss, the gradient and
    the new weights are those of one plain AdamW step over the whole global batch, with the conversations
    that opened with a wrong answer cut to max_length. Under ZeRO-3 each worker trains a slice of every
    parameter, and the saved model is gathered from both. At ZeRO-0 the gradient norm is measured here, not
    by DeepSpeed."""
    max_length, lr = 40, 1e-3
    if positive < NUM_POSITIVE:
        rows = rows[:positive] + rows[NUM_POSITIVE:]  # and the weight-0 rows
        weighted_dir = tmp_path / "weighted"
        weighted_dir.mkdir()
        pq.write_table(pa.Table.from_pylist(rows), weighted_dir / "part-0.parquet")
        weighted_dir = str(weighted_dir)
        tmp_path = tmp_path / "train"
    expected = reference_update(model_path, rows, max_length, lr, loss_kind)
    assert 0 < expected["truncated"] < positive
    cfg = make_config(
        num_workers=2, zero_stage=stage, epochs=1, global_batch_size=NUM_POSITIVE, micro_batch_size=4,
        loss=loss_kind, lr=lr, grad_clip=0.0, max_length=max_length, log_every=1, tensorboard=True,
    )
    log_sizes = worker_log_sizes(ray_cluster)
    stats = train_weighted_sft(cfg, weighted_dir, model_path, str(tmp_path))
    assert stats["steps"] == 1 and stats["world_size"] == 2 and stats["lr"] == lr
    # Rank 0 alone logs the step and writes it to TensorBoard.
    assert [row["step"] for row in logged_steps(ray_cluster, since=log_sizes)] == [1]
    [run] = (tmp_path / TENSORBOARD_DIR).iterdir()
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert stats["loaded_partitioned"] == loads_partitioned(cfg.train, transformers.__version__)
    assert stats["initial_loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
    assert stats["truncated_examples"] == stats["truncated"] == expected["truncated"]
    trained, initial = parameters(tmp_path / MODEL_DIR), parameters(model_path)
    assert trained.keys() == expected["weights"].keys()
    for name, tensor in expected["weights"].items():
        # Adam's first step is lr·g/(|g|+ε): where the micro-batches' gradients cancel to near ε (~1e-8),
        # summing them in another order (float32 rounding of the larger terms) is not small against g,
        # and moves that element's step by a few 1e-3·lr (seen: 1.6e-3·lr in 1 of 16k elements).
        torch.testing.assert_close(trained[name], tensor, rtol=1e-5, atol=1e-2 * lr)
        assert not torch.equal(trained[name], initial[name]), name


@pytest.mark.parametrize(
    "stage, version, partitioned",
    [(3, "5.24.0", True), (3, "5.25.0.dev0", True), (3, "6.0.0", True), (3, "5.23.1", False), (3, "5.0.0", False),
     (2, "5.24.0", False), (0, "6.1.0", False)],
)
def test_only_zero3_with_a_transformers_release_that_loads_right_loads_each_rank_its_share(stage, version, partitioned):
    assert loads_partitioned(TrainConfig(zero_stage=stage), version) is partitioned


@pytest.mark.parametrize("saved", ["model", "lora-merged", "lora-adapter"])
def test_the_saved_twin_of_a_zero3_model_holds_the_gathered_weights_with_tied_embeddings_kept_tied(tmp_path, saved):
    """What rank 0 saves under ZeRO-3: a model rebuilt around the gathered state dict, in which DeepSpeed
    gives tied parameters one tensor (Qwen2.5 up to 3B ties its input and output embeddings)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    from drift_ray.demo_model import build_model_config
    from drift_ray.train import _module_with_weights

    config = build_model_config(vocab_size=320)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    base = tmp_path / "base"
    original = AutoModelForCausalLM.from_config(config)
    # As an instruct model ships it: generation_config.json, which config.json does not imply.
    original.generation_config = GenerationConfig(eos_token_id=[config.eos_token_id, 3], temperature=0.7, do_sample=True)
    original.save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if saved != "model":
        lora = PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
        model = get_peft_model(model, lora)
    # One tensor per parameter, shared by the names of a tied one, as DeepSpeed's gathered state dict has it.
    gathered = {name: param.detach().clone() for name, param in model.named_parameters(remove_duplicate=False)}
    embeddings = next(name for name in gathered if name.endswith("embed_tokens.weight"))
    gathered[embeddings.replace("model.embed_tokens", "lm_head")] = gathered[embeddings]

    twin = _module_with_weights(model, gathered)
    if saved == "lora-merged":
        twin, model = twin.merge_and_unload(), model.merge_and_unload()
    twin.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(
        base if saved == "lora-adapter" else tmp_path / "saved", dtype=torch.float32
    )
    if saved == "lora-adapter":
        assert json.loads((tmp_path / "saved" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
        loaded = PeftModel.from_pretrained(loaded, tmp_path / "saved")
    else:
        generation = GenerationConfig.from_pretrained(tmp_path / "saved").to_diff_dict()
        assert generation == GenerationConfig.from_pretrained(base).to_diff_dict()
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_checkpoints_of_a_killed_run_with_other_settings_are_named_with_what_differs(tmp_path):
    settings = {"train": {"lr": 2e-4, "epochs": 1}, "seed": 0}
    killed = {"train": {"lr": 1e-4, "epochs": 1}, "seed": 0}
    for run_settings, step in ((killed, 120), (settings, 7)):  # this run's own checkpoints: resumed, not named
        checkpoint = tmp_path / run_name(run_settings) / "checkpoint_2026-12-07_00-00-00.000000"
        checkpoint.mkdir(parents=True)
        (checkpoint / PROGRESS_FILE).write_text(json.dumps({"step": step}))
        (checkpoint.parent / TRAIN_SETTINGS_FILE).write_text(json.dumps(run_settings))
    (tmp_path / "weighted_sft-0123456789ab").mkdir()  # killed before its first checkpoint: nothing to lose
    [line] = other_runs_left(tmp_path, settings)
    assert line.startswith(f"{tmp_path / run_name(killed)} holds the checkpoints of a killed training with other settings")
    assert "(step 120 reached; differ in: train.lr (0.0001 then, 0.0002 now))" in line
    assert "this one starts at step 0 and removes them once its model is published" in line
    # Records it cannot read are named as such: a warning never stops the training.
    (tmp_path / run_name(killed) / TRAIN_SETTINGS_FILE).write_text("[]")
    odd = tmp_path / run_name(killed) / "checkpoint_2026-12-07_00-00-01.000000"
    odd.mkdir()
    (odd / PROGRESS_FILE).write_text(json.dumps({"step": None}))
    [line] = other_runs_left(tmp_path, settings)
    assert "(step 120 reached; differ in: not recorded)" in line


class SimulatedCrash(RuntimeError):
    pass


CRASH_AT_STEP = 2


KILLED_RUN_EXTRA_MB = 512


def train_loop_that_crashes_after_a_checkpoint(config: dict) -> None:
    """train_loop, killed right after the checkpoint of step CRASH_AT_STEP is registered. It first touches
    KILLED_RUN_EXTRA_MB more memory than the resumed run will, so that its peak stands out."""
    import ray.train

    torch.ones(KILLED_RUN_EXTRA_MB * 2**18)  # float32: 4 bytes each, freed at once
    report = ray.train.report

    def report_then_crash(metrics, checkpoint=None, **kwargs):
        report(metrics, checkpoint=checkpoint, **kwargs)
        if checkpoint is not None and metrics["step"] == CRASH_AT_STEP:
            ray.train.get_all_reported_checkpoints()  # waits until Ray Train has registered it
            raise SimulatedCrash(f"killed after the checkpoint of step {CRASH_AT_STEP}")

    with mock.patch.object(ray.train, "report", report_then_crash):
        train_loop(config)


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
    ray_cluster, zero2_run, tmp_path, weighted_dir, model_path, caplog
):
    # train.checkpoint_every left unset: the checkpoint of step CRASH_AT_STEP is that of the end of epoch 1.
    cfg = make_config(tensorboard=True, **SCHEDULED)
    assert CRASH_AT_STEP == NUM_POSITIVE // cfg.train.global_batch_size  # the steps of an epoch
    with pytest.raises(Exception, match="killed after the checkpoint"):
        train_weighted_sft(
            cfg, weighted_dir, model_path, str(tmp_path),
            train_loop_per_worker=train_loop_that_crashes_after_a_checkpoint,
        )
    assert not (tmp_path / MODEL_DIR).exists()
    leftover = tmp_path / f".{MODEL_DIR}.staging-killed"  # as a process killed while copying the model leaves it
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"cut short")
    # As a run stopped before Ray Train recorded its last checkpoint leaves it.
    [killed_run] = (tmp_path / RUN_STORAGE_DIR).iterdir()
    assert _recorded_progress(killed_run)["step"] == CRASH_AT_STEP
    # Its recorded checkpoint removed by hand: Ray Train could not resume it, said in a line before it starts.
    damaged = tmp_path / "damaged" / killed_run.name
    shutil.copytree(killed_run, damaged)
    for checkpoint in damaged.glob("checkpoint_*/"):
        shutil.rmtree(checkpoint)
    with pytest.raises(ValueError, match=f"^{re.escape(str(damaged))}: Ray Train cannot resume the killed training there "):
        _recorded_progress(damaged)
    assert _recorded_progress(tmp_path / "damaged") == {}  # no run there
    (killed_run / "checkpoint_unrecorded").mkdir()
    (killed_run / "checkpoint_unrecorded" / PROGRESS_FILE).write_text(json.dumps({"step": CRASH_AT_STEP + 1}))

    # Resumed with settings that only observe or place the run changed: still the same run. Killed once
    # more, after its final checkpoint and before the model was published.
    resumed_cfg = make_config(checkpoint_every=2, log_every=1, tensorboard=True, **SCHEDULED)
    staged = []
    log_sizes = worker_log_sizes(ray_cluster)

    def killed_before_publishing(staging, target):
        staged.append(json.loads((Path(staging) / STATS_FILE).read_text()))
        raise SimulatedCrash("killed before publishing the model")

    said_before_the_training = []

    def fit_after_what_was_said(trainer):
        said_before_the_training.extend(record.getMessage() for record in caplog.records)
        return fit(trainer)

    fit = drift_ray.train._fit
    with mock.patch("drift_ray.train.publish_directory", killed_before_publishing), caplog.at_level(logging.INFO, logger="drift_ray"):
        with pytest.raises(SimulatedCrash), mock.patch("drift_ray.train._fit", fit_after_what_was_said):
            train_weighted_sft(resumed_cfg, weighted_dir, model_path, str(tmp_path))
    [resumed_stats] = staged
    assert resumed_stats["resumed_from_step"] == CRASH_AT_STEP
    said = f"weighted SFT: resuming after step {CRASH_AT_STEP} of {resumed_stats['steps']}, from the run's latest checkpoint"
    assert said in worker_output(ray_cluster, since=log_sizes)
    # By the driver, before the training: a run killed again before its end has said it in run_dir's log too.
    [unrecorded] = [message for message in said_before_the_training if "were saved, but the run was stopped" in message]
    assert unrecorded.startswith(f"weighted SFT: the checkpoint(s) of step(s) {CRASH_AT_STEP + 1} were saved")
    assert f"so this run resumes after step {CRASH_AT_STEP} and trains those steps again" in unrecorded
    # Where it starts, said by the driver too (the worker's line above reaches the console only).
    assert f"weighted SFT: resuming after step {CRASH_AT_STEP}, from the checkpoint recorded last in {killed_run}" in said_before_the_training
    caplog.clear()
    # The next call trains no step: it publishes the finished training, and says that it took it over.
    [checkpoints] = (tmp_path / RUN_STORAGE_DIR).iterdir()
    assert list(checkpoints.glob("checkpoint_*"))
    with caplog.at_level(logging.INFO, logger="drift_ray"):
        stats = train_weighted_sft(resumed_cfg, weighted_dir, model_path, str(tmp_path))
    assert not any("were saved, but the run was stopped" in record.getMessage() for record in caplog.records)  # finished
    assert (
        f"weighted SFT: the training in {checkpoints} reached its last step before it was stopped; its model is "
        "published from its final checkpoint"
    ) in [record.getMessage() for record in caplog.records]
    assert not list(tmp_path.glob(f".{MODEL_DIR}.staging-*"))
    # Published, the model needs its checkpoints no more: they would hold it twice, and the optimizer's states.
    assert not checkpoints.exists()
    uninterrupted_out, uninterrupted = zero2_run
    assert stats == {**resumed_stats, "resumed_from_step": stats["steps"], "wall_seconds": stats["wall_seconds"]}
    assert stats["steps"] == uninterrupted["steps"]
    assert stats["final_loss"] == pytest.approx(uninterrupted["final_loss"], rel=1e-5)
    # The steps before the crash come from the checkpoint: the resumed run's curve is the whole curve.
    resumed_steps, expected_steps = step_metrics(tmp_path), step_metrics(uninterrupted_out)
    assert [row["step"] for row in resumed_steps] == [row["step"] for row in expected_steps]
    assert [row["loss"] for row in resumed_steps] == pytest.approx([row["loss"] for row in expected_steps], rel=1e-5)
    # The killed run's peak still counts, though the resumed run's processes never reached it.
    peaks = [row["peak_rss_mb"] for row in resumed_steps]
    assert peaks == sorted(peaks) and peaks[-1] <= stats["peak_rss_mb"]
    assert peaks[CRASH_AT_STEP - 1] > expected_steps[CRASH_AT_STEP - 1]["peak_rss_mb"] + KILLED_RUN_EXTRA_MB / 2
    # The resumed run picks up the schedule where it stopped: one warmup step, then cosine to 0.
    lr = make_config().train.lr
    assert [row["lr"] for row in resumed_steps] == pytest.approx([lr / 2, lr, 0.75 * lr, 0.25 * lr], rel=1e-6)
    resumed, expected = parameters(tmp_path / MODEL_DIR), parameters(uninterrupted_out / MODEL_DIR)
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-7)
    # TensorBoard shows one curve: the killed run's event file and the resumed run's, in one directory.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [run] = (tmp_path / TENSORBOARD_DIR).iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (row["step"], pytest.approx(row["loss"], rel=1e-6)) for row in resumed_steps
    ]


def test_event_files_of_one_second_sort_in_the_order_of_their_steps(tmp_path, monkeypatch):
    """TensorBoard reads a run's event files in the order of their names; checkpoints less than a second apart
    start files in one second (before, from_step_13 sorted before from_step_9: a zig-zag curve, or steps
    dropped by a TensorBoard reading the run as it grew)."""
    import time

    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)  # the second tensorboardX names each file by
    for first_step in (1, 13, 9, 100):
        _event_writer(str(tmp_path), first_step, purge=first_step > 1).close()
    names = sorted(path.name for path in tmp_path.iterdir())
    assert [int(name.rsplit("from_step_", 1)[1]) for name in names] == [1, 9, 13, 100]


@pytest.mark.ray
@pytest.mark.slow
def test_lora_with_gradient_checkpointing_changes_only_the_adapted_matrices_and_saves_them_merged(
    ray_cluster, tmp_path, weighted_dir, model_path
):
    """Under ZeRO-3 on two workers: the merge runs on a twin of the model that holds the weights gathered
    from both ranks, and every weight outside the adapted matrices comes back bit for bit. With a recent
    transformers each rank also loaded only its share: those weights were loaded right on both ranks."""
    cfg = make_config(gradient_checkpointing=True, num_workers=2, zero_stage=3)
    cfg.train.lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])
    stats = train_weighted_sft(cfg, weighted_dir, model_path, str(tmp_path))
    assert stats["loaded_partitioned"] == loads_partitioned(cfg.train, transformers.__version__)
    peaks = [row["peak_rss_mb"] for row in step_metrics(tmp_path)]  # the larger of the two ranks' so far
    assert peaks == sorted(peaks) and 100 < peaks[0] and peaks[-1] <= stats["peak_rss_mb"]
    trained, initial = parameters(tmp_path / MODEL_DIR), parameters(model_path)
    assert trained.keys() == initial.keys()  # merged: a plain model, no adapter weights
    # Checkpointing is for the training: the saved model still generates with its KV cache.
    assert json.loads((tmp_path / MODEL_DIR / "config.json").read_text()).get("use_cache", True) is True
    for name, tensor in initial.items():
        adapted = name.endswith(("q_proj.weight", "v_proj.weight"))
        assert torch.equal(trained[name], tensor) != adapted, name


@pytest.mark.ray
@pytest.mark.slow
def test_lora_adapter_saved_unmerged_is_loaded_by_the_engine_on_its_base(ray_cluster, tmp_path, weighted_dir, model_path):
    from drift_ray.engines import TransformersEngine, lora_adapter_base
    from drift_ray.episode import SamplingParams

    cfg = make_config()
    cfg.train.lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], merge=False)
    train_weighted_sft(cfg, weighted_dir, model_path, str(tmp_path))
    adapter_dir = tmp_path / MODEL_DIR
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "model.safetensors").exists()
    assert lora_adapter_base(str(adapter_dir)) == model_path
    engine = TransformersEngine(str(adapter_dir))
    assert any("lora_A" in name for name, _ in engine.model.named_parameters())
    [[reply]] = engine.generate([[{"role": "user", "content": "hi"}]], SamplingParams(0.0, max_new_tokens=4), 1)
    assert reply.completion_tokens >= 1


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), float("-inf")])
def test_a_loss_or_gradient_norm_that_is_not_finite_stops_the_run_naming_the_step(loss):
    with pytest.raises(FloatingPointError, match=rf"the loss of step 3 of 8 is {loss}\. Lower train\.lr \(now 0\.01\)$"):
        require_finite_step(loss, 1.0, 3, 8, TrainConfig(lr=0.01))
    with pytest.raises(FloatingPointError, match=r"\(now 0\.01\), or turn train\.grad_clip on \(now 0\)$"):
        require_finite_step(loss, None, 3, 8, TrainConfig(lr=0.01, grad_clip=0))
    # With ZeRO, DeepSpeed skips an update whose gradient is not finite, as if it were an fp16 overflow.
    with pytest.raises(FloatingPointError, match=rf"the gradient norm of step 3 of 8 is {loss} \(its loss 12\.5\)\. Lower"):
        require_finite_step(12.5, loss, 3, 8, TrainConfig(lr=0.01))
    require_finite_step(12.5, 0.5, 3, 8, TrainConfig(lr=0.01))
    require_finite_step(12.5, None, 3, 8, TrainConfig(lr=0.01))  # a norm that was not measured


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.extended  # the check itself is tested above; this is its place in a real run
def test_a_diverged_run_stops_naming_the_step_and_leaves_no_model(ray_cluster, tmp_path, weighted_dir, model_path):
    from ray.train import TrainingFailedError

    message = r"weighted SFT diverged: the loss of step 2 of 4 is nan\. Lower train\.lr \(now 1e\+30\)\n"
    with pytest.raises(TrainingFailedError, match=message):
        train_weighted_sft(make_config(lr=1e30), weighted_dir, model_path, str(tmp_path))
    assert not (tmp_path / MODEL_DIR).exists()


CHATML_TURN = "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
GENERATION_PROMPT = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(
    "examples, chat_template, error",
    [
        # Writes only the last assistant message, as templates that drop earlier reasoning do: all_turns
        # cannot mask the earlier replies, since the later contexts do not hold them.
        (
            ExampleKind.all_turns,
            "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}" + CHATML_TURN
            + "{% endif %}{% endfor %}" + GENERATION_PROMPT,
            "the chat template is not prefix-stable",
        ),
        # Refuses the conversation, as templates that take no system message do (jinja2's TemplateError).
        (
            ExampleKind.last_turn,
            "{% for m in messages %}{% if m['content'].startswith('Incorrect') %}"
            "{{ raise_exception('this template takes no feedback') }}{% endif %}" + CHATML_TURN
            + "{% endfor %}" + GENERATION_PROMPT,
            "this template takes no feedback",
        ),
    ],
)
def test_an_example_the_chat_template_cannot_mask_names_its_trajectory(
    ray_cluster, tmp_path, model_path, examples, chat_template, error
):
    from ray.train import TrainingFailedError

    model = tmp_path / "model"
    shutil.copytree(model_path, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(model)
    weighted = tmp_path / "weighted"
    weighted.mkdir()
    rows = {
        schema.TRAJECTORY_ID: ["q/0", "q/1"],
        schema.MESSAGES: [conversation(1, k, wrong_first=True) for k in range(2)],
        schema.WEIGHT: [1.0, 1.0],
    }
    pq.write_table(pa.table(rows), weighted / "part-0.parquet")
    cfg = make_config(examples=examples, global_batch_size=2, micro_batch_size=1)
    with pytest.raises(TrainingFailedError, match=rf"trajectory 'q/[01]': .*{error}"):
        train_weighted_sft(cfg, str(weighted), str(model), str(tmp_path / "out"))
    assert not (tmp_path / "out" / MODEL_DIR).exists()
