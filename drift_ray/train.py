"""Weighted SFT on Ray Train + DeepSpeed ZeRO: the driver (`train_weighted_sft`) and the worker loop (`train_loop`).

The update of every optimizer step is exactly that of one global batch:  Σ_i w_i·L_i / normalizer  over
its samples, whatever the number of data-parallel ranks and micro-batches (see `weighted_sft.loss_normalizer`).
To make that hold, and to make a resumed run replay exactly, the split of the data into global batches
and micro-batches is a pure function of the seed and the sizes (`plan_steps`): every rank reads all the
(small, text-only) training rows and runs its own share of each global batch. A rank that has fewer real
micro-batches in the one smaller global batch of an epoch (wherever the plan puts it) runs a weight-0
filler micro-batch, so all ranks agree on where the accumulation boundary is.

DeepSpeed runs on GPUs (NCCL) and on CPUs (its CPU accelerator, gloo); in both cases it reuses the
process group Ray Train set up. Checkpoints are DeepSpeed checkpoints reported to Ray Train; the run
name hashes the config, so rerunning the same config resumes from its latest checkpoint. The final
checkpoint holds a transformers model directory, which the driver moves to `out_dir/model`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from drift_ray.config import Config, LossKind, TrainConfig, accumulation_steps
from drift_ray.schema import (
    CUT_OFF,
    MESSAGES,
    TRAIN_INPUT,
    TRAJECTORY_ID,
    WEIGHT,
    cut_off_column,
    holds_flags,
    require_columns,
)
from drift_ray.signals import handled_as_before
from drift_ray.trajectories import (
    RERUN_REMEDY,
    TRAIN_SETTINGS_FILE,
    TrajectoryFileError,
    conversations_fingerprint,
    files_fingerprint,
    publish_directory,
    read_json_object,
    require_parquet,
    require_same_settings,
    settings_changes,
    weighted_fingerprint,
    write_json_atomic,
)
from drift_ray.weights import invalid_conversations, invalid_weights
from drift_ray.weighted_sft import (
    collate,
    global_batches,
    loss_normalizer,
    lr_lambda,
    padding_token_id,
    per_sample_nll,
    tokenize_trajectory,
    weighted_loss,
)


MODEL_DIR = "model"  # under out_dir: the trained model, loadable with from_pretrained
STATS_FILE = "drift_train.json"  # inside MODEL_DIR: the training statistics
STEPS_FILE = "drift_train_steps.jsonl"  # inside MODEL_DIR: one line of metrics per optimizer step
RUN_STORAGE_DIR = "ray_train"  # under out_dir: Ray Train's run directories and checkpoints
RUN_NAME_PREFIX = "weighted_sft-"  # of a run directory there (see run_name)
HF_CHECKPOINT_DIR = "hf_model"  # inside the final checkpoint: the model as save_pretrained writes it
DEEPSPEED_TAG = "deepspeed"  # inside an intermediate checkpoint: DeepSpeed's state
PROGRESS_FILE = "progress.json"  # inside every checkpoint: the step reached and the statistics so far
TENSORBOARD_DIR = "tensorboard"  # under out_dir: rank 0's event files, with train.tensorboard
TENSORBOARD_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "truncated", "peak_rss_mb")  # as train/<name>
# The oldest transformers release whose ZeRO-3 loading (zero.Init) was checked to load every weight right
# on several ranks: 5.0.0 loaded some attention projections wrong, differently from run to run. The
# releases in between were not tried, so they load the whole model.
PARTITIONED_LOADING_SINCE = (5, 24)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MicroBatch:
    """Indices of examples in one forward pass, with their weights."""

    indices: list[int]
    weights: list[float]
    # A weight-0 filler keeps every rank at the same number of micro-batches per step; it moves nothing.
    filler: bool = False


@dataclass(frozen=True)
class OptimizerStep:
    """One global batch: its normalizer and, per rank, the micro-batches that rank runs in order."""

    epoch: int
    normalizer: float
    micro_batches: list[list[MicroBatch]]  # [rank][accumulation step]


def plan_steps(
    lengths: Sequence[int],
    weights: Sequence[float],
    *,
    global_batch_size: int,
    micro_batch_size: int,
    world_size: int,
    epochs: int,
    seed: int,
    loss: LossKind | str,
) -> list[OptimizerStep]:
    """Every optimizer step of the run, the same for a seed whatever the world size.

    Each epoch, `global_batches` cuts the examples into global batches (one of them, anywhere in the
    order, may be smaller). A global batch is sorted by length, cut into micro-batches,
    and rank r runs micro-batches r, r+W, r+2W, … of it; the normalizer is that of the whole global batch.
    """
    accumulation = accumulation_steps(global_batch_size, micro_batch_size, world_size)
    steps = []
    for epoch in range(epochs):
        for batch in global_batches(lengths, global_batch_size, (seed, epoch), loss):
            batch = sorted(batch, key=lambda i: lengths[i])
            chunks = [batch[i : i + micro_batch_size] for i in range(0, len(batch), micro_batch_size)]
            filler = MicroBatch([batch[0]], [0.0], filler=True)
            by_rank = []
            for rank in range(world_size):
                own = [MicroBatch(chunk, [float(weights[i]) for i in chunk]) for chunk in chunks[rank::world_size]]
                by_rank.append(own + [filler] * (accumulation - len(own)))
            normalizer = loss_normalizer([weights[i] for i in batch], loss)
            steps.append(OptimizerStep(epoch, normalizer, by_rank))
    return steps


def deepspeed_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: ZeRO stage, offload, precision, clipping and batch sizes."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
        if train.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    config: dict[str, Any] = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(
            train.global_batch_size, train.micro_batch_size, world_size
        ),
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": train.bf16},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # progress is logged by rank 0 (train.log_every)
    }
    if train.offload:
        # With offload the optimizer runs on the CPU: DeepSpeed's CPU Adam is many times faster than torch's.
        config["optimizer"] = {"type": "AdamW", "params": {"lr": train.lr, "weight_decay": train.weight_decay}}
    return config


def loads_partitioned(train: TrainConfig, transformers_version: str) -> bool:
    """Whether each rank loads only its share of the model (ZeRO-3 with a transformers release from
    PARTITIONED_LOADING_SINCE on); otherwise every rank loads the whole model into CPU memory and
    DeepSpeed partitions it when the engine starts. A version string without a leading major.minor counts
    as an older release."""
    if train.zero_stage != 3:
        return False
    major_minor = re.match(r"(\d+)\.(\d+)", transformers_version)
    return major_minor is not None and tuple(map(int, major_minor.groups())) >= PARTITIONED_LOADING_SINCE


# They observe or place the run, and leave the model as it was: changing one must neither refuse a
# finished model nor, through run_name, start a killed run again from step 0 instead of resuming it.
# (cpus_per_worker is not one: on CPU it sets torch's threads, and with them the order of float sums.)
UNCHANGING_TRAIN_SETTINGS = ("tensorboard", "log_every", "checkpoint_every", "resources")


def train_settings(cfg: Config, weighted_dir: str, model_path: str, out_dir: Path) -> dict[str, Any]:
    """Everything that changes a training run into `out_dir`. Local paths are relative to out_dir, so a
    run_dir that moved (with its inputs) is the same run; URIs and hub ids stay as given."""
    return {
        "train": cfg.train.model_dump(mode="json", exclude=set(UNCHANGING_TRAIN_SETTINGS)),
        "seed": cfg.seed,
        "weighted_dir": weighted_dir if "://" in weighted_dir else os.path.relpath(weighted_dir, out_dir),
        # `drift-ray weights` may have rewritten the file at that path since: another β changes the weights,
        # other rollouts the conversations (and the weights too, unless they come out the same).
        "weighted_fingerprint": weighted_fingerprint(weighted_dir),
        "conversations_fingerprint": conversations_fingerprint(weighted_dir),
        "model_path": os.path.relpath(model_path, out_dir) if os.path.isdir(model_path) else model_path,
        "model_fingerprint": files_fingerprint(model_path),
    }


def require_training_columns(columns: Sequence[str], source: str) -> None:
    """Refuse weighted SFT's input `source` without a column of TRAIN_INPUT, with the remedy for what it lacks."""
    if MESSAGES not in columns:  # first: the weights stage does not need them, and would not add them
        remedy = "Weighted SFT trains on each trajectory's conversation: give the trajectories theirs."
    elif WEIGHT not in columns:
        remedy = "Weigh the trajectories with `drift-ray weights` first: it adds the weight column."
    else:  # trajectory_id: an earlier `drift-ray weights`, given Parquet without ids, wrote such files
        remedy = (
            "Weigh the trajectories again with `drift-ray weights`, which gives those without ids theirs (a prompt's "
            "rows are its samples 0, 1, … in file order), or give them a trajectory_id column."
        )
    require_columns(columns, TRAIN_INPUT, stage="weighted SFT", source=source, remedy=remedy)


def require_training_input(weighted_dir: str) -> None:
    """Fail unless `weighted_dir` holds Parquet for weighted SFT; a URI (s3://…) is left to Ray Data to
    read, and to report."""
    if "://" not in weighted_dir:
        hint = "weighted SFT reads the Parquet that `drift-ray weights` writes"
        for file in require_parquet(weighted_dir, hint=hint):
            try:
                columns = pq.read_schema(file).names
            except (pa.ArrowException, OSError) as err:
                raise TrajectoryFileError(f"{file}: not a readable Parquet file ({err}); {hint}") from err
            require_training_columns(columns, str(file))


def finished_model(out_dir: str | Path) -> bool:
    """Whether weighted SFT into `out_dir` finished: the statistics beside the model mark it whole."""
    return (Path(out_dir) / MODEL_DIR / STATS_FILE).exists()


def read_stats(model_dir: str | Path) -> dict[str, Any]:
    """The statistics weighted SFT wrote beside the model in `model_dir` (STATS_FILE)."""
    remedy = f"the statistics mark the model finished: remove {model_dir} to train it again"
    return read_json_object(Path(model_dir) / STATS_FILE, remedy)


def run_name(settings: dict[str, Any]) -> str:
    """A name that changes with train_settings, so that only the same run resumes."""
    return RUN_NAME_PREFIX + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def train_weighted_sft(
    cfg: Config,
    weighted_dir: str,
    model_path: str,
    out_dir: str,
    *,
    start_ray: Callable[[], None] | None = None,
    train_loop_per_worker: Callable[[dict[str, Any]], None] | None = None,
    other_settings_remedy: str = RERUN_REMEDY,
) -> dict[str, Any]:
    """Weighted SFT of `model_path` on the weighted rollouts in `weighted_dir`; the model goes to out_dir/model.

    Skipped when out_dir/model exists (it appears whole or not at all), and refused when other settings
    made it (out_dir/model/TRAIN_SETTINGS_FILE records them), with `other_settings_remedy`. A run killed part-way resumes
    from its latest checkpoint when called again with the same config. Checkpoints go under out_dir,
    which on a multi-node cluster must be storage that every node sees (Ray Train's storage_path).
    Returns the training statistics: steps, tokens, examples, initial_loss, final_loss (mean over the
    last epoch's steps), grad_norm and lr of the last step, seconds (training), tokens_per_s,
    wall_seconds (all of it, start-up included), resumed_from_step (the steps an earlier, killed call had
    done: `steps` when it was killed after training, before the model was published), loaded_partitioned
    (whether each rank loaded only its share of the model, see loads_partitioned) and peak_rss_mb (the
    largest peak resident memory of a worker process, in MiB, the final save included). The metrics of every step
    (step, epoch, loss, lr, grad_norm, cumulative tokens and seconds, peak_rss_mb so far) go to
    out_dir/model/STEPS_FILE, steps before a resume included.
    Needs a running Ray, or `start_ray`, called only when there is training to do.
    `train_loop_per_worker` replaces `train_loop` (tests and benchmarks wrap it to inject failures or
    measure); its final metrics must hold train_loop's, call_id included.
    """
    import pyarrow.fs
    import ray.data
    from ray.data.expressions import col
    from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(out_dir).resolve()
    model_out = out / MODEL_DIR
    settings = train_settings(cfg, weighted_dir, model_path, out)
    if finished_model(out):
        require_same_settings(
            model_out / TRAIN_SETTINGS_FILE,
            settings,
            output=str(model_out),
            ignore=[f"train.{name}" for name in UNCHANGING_TRAIN_SETTINGS],  # which older records hold
            # The same model files at another relative path (the demo reference's cache, seen from a run_dir
            # that moved) are the same model; the same weighted rollouts elsewhere (`drift-ray weights
            # --output` before `drift-ray run`) the same input: conversations_fingerprint still compares them.
            known_by={"model_path": "model_fingerprint", "weighted_dir": "weighted_fingerprint"},
            # Files rewritten at the same paths: other weights, other rollouts or another model.
            inputs=["weighted_fingerprint", "conversations_fingerprint", "model_fingerprint"],
            meanings={
                "weighted_dir": "the weighted trajectories trained on (`drift-ray train --input`; `run`'s own weights)",
                "model_path": "the model trained (`drift-ray train --model`, else rollout.model; in `run`'s later rounds, the model of the round before)",
            },
            remedy=other_settings_remedy,
        )
        _remove_checkpoints(out)  # those a run killed after publishing, or an older drift-ray, left
        return read_stats(model_out)
    require_training_input(weighted_dir)
    if start_ray:
        start_ray()
    out.mkdir(parents=True, exist_ok=True)
    if os.path.isdir(model_path):
        model_path = os.path.abspath(model_path)  # the workers need not share the driver's working directory
    started = time.perf_counter()
    accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.num_workers)

    ds = ray.data.read_parquet(weighted_dir)
    schema = ds.schema()
    require_training_columns(schema.names, weighted_dir)
    weight_type = schema.types[schema.names.index(WEIGHT)]
    if not (pa.types.is_floating(weight_type) or pa.types.is_integer(weight_type)):
        raise ValueError(f"{weighted_dir}: column {WEIGHT!r} holds {weight_type}; expected numbers")
    flags_type = schema.types[schema.names.index(CUT_OFF)] if CUT_OFF in schema.names else pa.null()
    if not holds_flags(flags_type):
        expected = "lists of booleans, a flag per turn"
        raise ValueError(f"{weighted_dir}: column {CUT_OFF!r} holds {flags_type}; expected {expected}")
    invalid = ds.select_columns([TRAJECTORY_ID, WEIGHT]).map_batches(invalid_weights, batch_format="pyarrow").take(3)
    if invalid:
        found = ", ".join(f"{row[WEIGHT]!r} at {row[TRAJECTORY_ID]!r}" for row in invalid)
        raise ValueError(f"{weighted_dir}: {WEIGHT!r} must be finite and >= 0; found {found}")
    # success_only weighting gives weight 0 to most rows. Dropped rather than trained with weight 0: they
    # would cost compute, and under train.loss=sample_mean only shrink each step by the share of failures.
    # So success_only trains as SFT on the successes (RFT).
    # Materialized before the workers start: the rows are text, and a read after the workers took
    # every CPU of a small cluster would wait forever.
    # Flags that are all null (as Arrow types a column of them) say nothing: read as none.
    columns = [*TRAIN_INPUT, *([CUT_OFF] if not pa.types.is_null(flags_type) else [])]
    ds = ds.select_columns(columns).filter(expr=col(WEIGHT) > 0).materialize()
    if ds.count() == 0:
        raise ValueError(
            f"{weighted_dir}: no trajectory has a positive {WEIGHT!r}; weighted SFT needs at least one "
            f"(with weights.mode=success_only: no rollout reached a correct answer)"
        )
    invalid = ds.map_batches(invalid_conversations, batch_format="pyarrow").take(3)
    if invalid:
        found = "; ".join(f"{row[TRAJECTORY_ID]!r}: {row['problem']}" for row in invalid)
        raise ValueError(f"{weighted_dir}: conversations that weighted SFT cannot train on: {found}")

    # Stamped on the final metrics: a final checkpoint with another stamp was written by an earlier call.
    call_id = uuid.uuid4().hex
    runs, name = out / RUN_STORAGE_DIR, run_name(settings)
    trainer = TorchTrainer(
        train_loop_per_worker or train_loop,
        train_loop_config={
            "train": cfg.train.model_dump(mode="json"),
            "seed": cfg.seed,
            "model_path": model_path,
            "call_id": call_id,
            # One directory per run: a rerun with other settings is another curve, not the same one continued.
            "tensorboard_dir": str(out / TENSORBOARD_DIR / name),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **cfg.train.resources},
        ),
        run_config=RunConfig(
            storage_path=str(runs),
            name=name,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": ds},
        # Every rank reads all rows and takes its share of each global batch itself (see plan_steps).
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    for warning in other_runs_left(runs, settings):
        log.warning("weighted SFT: %s", warning)
    # Said before the training, not by its first worker: the driver's log reaches run_dir's (see lock_run_dir).
    resumed = _recorded_progress(runs / name)
    saved_steps = _saved_steps(_checkpoints_progress(runs / name))
    if resumed is None:
        log.info("weighted SFT: this Ray Train reads no record of its checkpoints here; its first worker says where the training starts")
    else:
        log.info("weighted SFT: %s", starting_point(resumed, runs / name))
        if not resumed.get("finished") and (unrecorded := unrecorded_checkpoints(saved_steps, int(resumed.get("step", 0)))):
            log.warning("weighted SFT: %s", unrecorded)
    write_json_atomic(settings, runs / name / TRAIN_SETTINGS_FILE)  # for a run with other settings to name
    result = _fit(trainer)

    # A copy left by a process killed while copying: a whole model's size on disk, never to be published.
    for leftover in out.glob(f".{MODEL_DIR}.staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR}.staging-", dir=out))
    try:
        pyarrow.fs.copy_files(
            f"{result.checkpoint.path}/{HF_CHECKPOINT_DIR}",
            str(staging),
            source_filesystem=result.checkpoint.filesystem,
            destination_filesystem=pyarrow.fs.LocalFileSystem(),
        )
        stats = {**result.metrics, "wall_seconds": round(time.perf_counter() - started, 2)}
        if stats.pop("call_id", None) != call_id:
            # Killed after its final checkpoint, before the model was published: no step was trained now.
            stats["resumed_from_step"] = stats["steps"]
        (staging / TRAIN_SETTINGS_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        (staging / STATS_FILE).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
        publish_directory(staging, model_out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _remove_checkpoints(out)
    return stats


def other_runs_left(runs: Path, settings: dict[str, Any]) -> list[str]:
    """What the checkpoints under `runs` (out_dir's Ray Train storage) of killed runs with settings other
    than `settings` hold, one line each: the run about to start does not resume them, and removes them
    once its model is published (a rerun with their settings would resume one)."""
    lines, name = [], run_name(settings)
    for run in sorted(path for path in runs.glob(f"{RUN_NAME_PREFIX}*") if path.is_dir() and path.name != name):
        progress = _checkpoints_progress(run)
        if not progress:
            continue
        finished = any(entry.get("finished") for entry in progress)
        done = "trained to the end" if finished else f"step {max(_saved_steps(progress), default=0)} reached"
        recorded: Any = None
        with contextlib.suppress(OSError, ValueError):
            recorded = json.loads((run / TRAIN_SETTINGS_FILE).read_text())
        changes = settings_changes(recorded, settings) if isinstance(recorded, dict) else "not recorded"
        lines.append(
            f"{run} holds the checkpoints of a killed training with other settings ({done}; differ in: {changes}); "
            "this one starts at step 0 and removes them once its model is published: rerun with those settings "
            "to resume that one instead"
        )
    return lines


def _fit(trainer: Any) -> Any:
    """trainer.fit(), where Ctrl-C and SIGTERM end as their handlers before fit say, as in every other stage.

    In the main thread fit installs Ray Train's own SIGINT handler, which aborts the run and so ends fit with
    SystemExit or the dead controller's error (a crash's exit status 1, without a word), or, where the run
    finished first, lets fit return; it is left installed, to end a later stage's Ctrl-C the same way, so
    the one before is restored. The exception a SIGTERM handler raises in fit (signals.Terminated, the
    drift-ray command's) reaches fit's caller as a KeyboardInterrupt. So each signal that came during fit is handed
    to its handler again, once fit is over (see handled_as_before), and a finished model is not published."""
    with handled_as_before(signal.SIGINT, signal.SIGTERM):
        return trainer.fit()


def _remove_checkpoints(out: Path) -> None:
    """Ray Train's checkpoints under `out`, whose model is published: they hold it a second time and, but for
    the final one, DeepSpeed's states (optimizer moments: several times the model's size). Only an
    unpublished run resumes from them, and any other run into `out` is refused while its model is there."""
    shutil.rmtree(out / RUN_STORAGE_DIR, ignore_errors=True)


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed ZeRO weighted SFT over this rank's share of every global batch.

    config: {"train": TrainConfig as JSON, "seed": int, "model_path": str, "call_id": str (goes into the final
    metrics), "tensorboard_dir": str}.
    """
    train = TrainConfig.model_validate(config["train"])
    seed = int(config["seed"])
    if not train.use_gpu:
        # Read once, when deepspeed is first imported: without it DeepSpeed looks for a GPU.
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import numpy as np
    import ray.train
    import torch
    import torch.distributed as dist
    import transformers
    from jinja2 import TemplateError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if not train.use_gpu:
        torch.set_num_threads(max(1, int(train.cpus_per_worker)))

    progress = _load_progress(ray.train.get_checkpoint())
    if progress.get("finished"):
        return  # a rerun after the final checkpoint: nothing left to train

    ids, conversations, weights, cut_offs = _read_rows(ray.train.get_dataset_shard("train"))
    # Characters stand in for tokens: ordering by length only needs to be roughly right, and this
    # spares every rank from tokenizing the whole data set.
    lengths = [sum(len(message["content"]) for message in messages) for messages in conversations]
    plan = plan_steps(
        lengths,
        weights,
        global_batch_size=train.global_batch_size,
        micro_batch_size=train.micro_batch_size,
        world_size=world_size,
        epochs=train.epochs,
        seed=seed,
        loss=train.loss,
    )

    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])
    pad_token_id = padding_token_id(tokenizer)
    deepspeed.init_distributed(dist_backend="nccl" if train.use_gpu else "gloo")  # joins Ray Train's group
    ds_config = deepspeed_config(train, world_size)
    partitioned = loads_partitioned(train, transformers.__version__)
    with _zero3_loading(ds_config) if partitioned else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(config["model_path"], dtype=torch.float32)
        # What happened, not what was asked for: zero.Init marks every parameter it partitions.
        loaded_partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
        if train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if train.lora.enabled:
            torch.manual_seed(seed)  # the adapter's initial weights
            model = _with_lora(model, train)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = None if train.offload else torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_lambda(step, len(plan), train.warmup_ratio, train.lr_schedule)
        ),
        config=ds_config,
        dist_init_required=False,
    )
    start_step = int(progress.get("step", 0))
    if start_step:
        with ray.train.get_checkpoint().as_directory() as checkpoint_dir:
            loaded, _ = engine.load_checkpoint(checkpoint_dir, tag=DEEPSPEED_TAG)
        if loaded is None:
            raise RuntimeError(f"rank {rank}: no DeepSpeed state under tag {DEEPSPEED_TAG!r} in the checkpoint")
        if rank == 0:  # Ray Train's own lines speak of a folder to delete, not of what goes on
            log.info("weighted SFT: resuming after step %d of %d, from the run's latest checkpoint", start_step, len(plan))
    # Every step's metrics, carried through checkpoints so that a resumed run keeps the whole curve.
    history: list[dict[str, Any]] = list(progress.get("history", []))
    tokens = history[-1]["tokens"] if history else 0
    # This run's processes count their peak from the resume; the killed run's still counts.
    resumed_peak_mb = history[-1].get("peak_rss_mb", 0.0) if history else 0.0
    seconds = float(progress.get("seconds", 0.0))
    tokenized: dict[int, Any] = {}
    # A resumed run purges the steps a killed run wrote after its last checkpoint (all of them without
    # checkpoints), which it now trains again.
    writer = None
    if train.tensorboard and rank == 0:
        writer = _event_writer(config["tensorboard_dir"], start_step + 1, purge=True)
    engine.train()
    # At ZeRO-0 without bf16 DeepSpeed steps a plain torch optimizer, which reports no gradient norm:
    # measure it on the reduced gradients just before that step, or a diverged last step would go unseen.
    measure_grad_norm = train.zero_stage == 0 and not train.bf16
    grad_norm = None

    for step_index in range(start_step, len(plan)):
        step = plan[step_index]
        step_started = time.perf_counter()
        # Dropout (LoRA) draws the same masks in a resumed run as in an uninterrupted one.
        torch.manual_seed(int(np.random.SeedSequence([seed, step_index, rank]).generate_state(1)[0]))
        lr = float(engine.get_lr()[0])  # the scheduler moves on inside the step's last engine.step()
        # [loss, tokens, examples cut to max_length] of this rank, on the device: NCCL reduces only
        # device tensors.
        totals = torch.zeros(3, dtype=torch.float64, device=engine.device)
        for micro in step.micro_batches[rank]:
            for i in micro.indices:
                if i not in tokenized:
                    try:
                        tokenized[i] = tokenize_trajectory(
                            tokenizer, conversations[i], train.examples, train.max_length, cut_offs[i]
                        )
                    # A chat template this example cannot be masked with, or one that refuses it
                    # (raise_exception raises jinja2's TemplateError).
                    except (ValueError, TemplateError) as err:
                        raise ValueError(f"trajectory {ids[i]!r}: {err}") from err
            batch = collate([tokenized[i] for i in micro.indices], micro.weights, pad_token_id, engine.device)
            # use_cache=False per call, not in the config: the saved model keeps its KV cache for generate().
            logits = engine(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits
            loss = weighted_loss(per_sample_nll(logits, batch["labels"]), batch["weights"], step.normalizer)
            # The micro-batch losses of all ranks sum to the global loss: undo DeepSpeed's division by
            # the accumulation steps (scale_wrt_gas) and its averaging of gradients over ranks (× W).
            engine.backward(loss * world_size, scale_wrt_gas=False)
            if measure_grad_norm and engine.is_gradient_accumulation_boundary():
                grad_norm = _norm_of_gradients(engine.module)
            engine.step()
            totals[0] += loss.detach().double()
            if not micro.filler:
                totals[1] += batch["attention_mask"].sum()
                totals[2] += sum(tokenized[i].cut_tokens > 0 for i in micro.indices)
        dist.all_reduce(totals)
        step_loss, step_tokens, step_truncated = totals.tolist()
        if not measure_grad_norm:
            grad_norm = _grad_norm(engine)
        # Every rank holds the same reduced loss and global gradient norm, so all of them stop here,
        # before a checkpoint or a saved model could carry the broken weights on.
        require_finite_step(step_loss, grad_norm, step_index + 1, len(plan), train)
        tokens += int(step_tokens)
        seconds += time.perf_counter() - step_started
        done = step_index + 1
        metrics = {
            "step": done,
            "total_steps": len(plan),
            "epoch": step.epoch,
            "loss": step_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "truncated": int(step_truncated),
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "peak_rss_mb": max(_peak_rss_mb_of_all_ranks(engine.device), resumed_peak_mb),
        }
        history.append(metrics)
        # Logged and written, not reported: every ray.train.report is a barrier that waits for Ray Train's
        # controller (about 2 s), which would dominate the step time of a small model.
        if rank == 0 and train.log_every and done % train.log_every == 0:
            # Through logging, not print: Ray Train turns a worker's print into a log record and, as Ray's
            # workers redirect stdout, prints it as well, so every line would show twice.
            log.info("weighted SFT %s", json.dumps(metrics))
        if writer is not None:
            for name in TENSORBOARD_SCALARS:
                if metrics[name] is not None:
                    writer.add_scalar(f"train/{name}", metrics[name], done)
            writer.flush()
        if done == len(plan):
            steps_per_epoch = len(plan) // train.epochs
            final = {
                **metrics,
                "steps": done,
                "examples": len(conversations),
                "world_size": world_size,
                "initial_loss": history[0]["loss"],
                "truncated_examples": sum(row["truncated"] for row in history),  # once per epoch
                "final_loss": float(np.mean([row["loss"] for row in history[-steps_per_epoch:]])),
                "resumed_from_step": start_step,
                "loaded_partitioned": loaded_partitioned,
                "call_id": config["call_id"],
            }
            _report_final(engine, tokenizer, train, rank, final, history)
        elif checkpoint_due(plan, done, train.checkpoint_every):
            if writer is not None:
                # A background thread writes the events: closing waits for it, so the steps up to a checkpoint
                # outlive a crash after it (a run resumed from it purges only the later ones).
                writer.close()
                writer = _event_writer(config["tensorboard_dir"], done + 1, purge=False)
            progress = {"step": done, "history": history, "seconds": seconds}
            _report_deepspeed_checkpoint(engine, rank, metrics, progress)
    if writer is not None:
        writer.close()


def checkpoint_due(plan: Sequence[OptimizerStep], done: int, every: int | None) -> bool:
    """Whether step `done` (1-based) of `plan` saves a checkpoint to resume from: every `every` steps, by
    default (None) at each epoch's end; never after the last step, which publishes the model."""
    if done >= len(plan):
        return False
    if every is None:
        return plan[done].epoch != plan[done - 1].epoch
    return every > 0 and done % every == 0


def _event_writer(logdir: str, first_step: int, purge: bool) -> Any:
    """A TensorBoard event writer for the steps from `first_step` on, into a file of its own in `logdir`;
    with `purge`, TensorBoard drops the steps from `first_step` on that earlier files of the run hold."""
    from tensorboardX import SummaryWriter

    # tensorboardX names a file by the second it was opened in: the suffix keeps two of one second apart.
    # Zero-padded: files of one second then sort, as TensorBoard reads them, in the order of their steps.
    suffix = f".from_step_{first_step:09d}"
    return SummaryWriter(logdir, purge_step=first_step if purge else None, filename_suffix=suffix)


def peak_rss_mb() -> float:
    """The peak resident memory of this process so far, in MiB."""
    import resource
    import sys

    # ru_maxrss counts KiB on Linux, bytes on macOS.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def _peak_rss_mb_of_all_ranks(device: Any) -> float:
    """The largest peak_rss_mb of any rank's worker process so far (every rank must call it; a resumed
    run's processes count from the resume)."""
    import torch
    import torch.distributed as dist

    peak = torch.tensor([peak_rss_mb()], dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return round(peak.item(), 1)


def require_finite_step(loss: float, grad_norm: float | None, step: int, steps: int, train: TrainConfig) -> None:
    """Stop a run whose loss or gradient norm turned NaN or infinite, naming the step and what to change.

    A gradient that is not finite under a finite loss is divergence too: with ZeRO, DeepSpeed takes it
    for an overflow and silently skips the update (and the scheduler's step), and there is no fp16 loss
    scale here whose overflows would be expected.
    """
    if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
        return
    what = f"the loss of step {step} of {steps} is {loss}"
    if math.isfinite(loss):
        what = f"the gradient norm of step {step} of {steps} is {grad_norm} (its loss {loss:.6g})"
    raise FloatingPointError(
        f"weighted SFT diverged: {what}. Lower train.lr (now {train.lr})"
        + (", or turn train.grad_clip on (now 0)" if not train.grad_clip else "")
    )


def _grad_norm(engine: Any) -> float | None:
    """The gradient norm of the last update, before clipping, over all ranks, as DeepSpeed reports it."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if hasattr(norm, "item") else norm)


def _norm_of_gradients(module: Any) -> float:
    """The global norm of `module`'s gradients; at ZeRO-0 every rank holds them whole once reduced."""
    import torch

    # Norms of norms: no copy of the gradients (torch.nn.utils.get_total_norm is newer than torch 2.4).
    norms = [torch.linalg.vector_norm(p.grad) for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _read_rows(shard: Any) -> tuple[list[Any], list[list[dict[str, str]]], list[float], list[list[bool | None] | None]]:
    """All training rows, ordered by trajectory id (the order the plan indexes must not depend on Ray Data):
    ids, conversations, weights and CUT_OFF flags (None for every row where the rollouts did not record them)."""
    tables = list(shard.iter_batches(batch_size=4096, batch_format="pyarrow"))
    table = pa.concat_tables(tables).sort_by(TRAJECTORY_ID)
    ids = table.column(TRAJECTORY_ID).to_pylist()
    duplicates = sorted({a for a, b in zip(ids, ids[1:]) if a == b})
    if duplicates:
        raise ValueError(
            f"weighted SFT needs one row per {TRAJECTORY_ID!r} to order the data reproducibly; "
            f"found {len(duplicates)} ids on several rows, e.g. {duplicates[:3]}"
        )
    flags = cut_off_column(table)
    cut_offs = flags.to_pylist() if flags is not None else [None] * table.num_rows
    return ids, table.column(MESSAGES).to_pylist(), [float(w) for w in table.column(WEIGHT).to_pylist()], cut_offs


@contextlib.contextmanager
def _zero3_loading(ds_config: dict[str, Any]) -> Any:
    """transformers loads models inside it under zero.Init: each rank keeps its share of every parameter,
    and only rank 0 reads the checkpoint's values. PEFT, whose adapter set-up gathers partitioned base
    weights, runs inside it too. Left right after: transformers would otherwise build every later model
    partitioned as well, such as the twin that rank 0 alone builds to save the trained weights, and
    zero.Init on one rank waits forever for the others."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_config = HfDeepSpeedConfig(ds_config)
    try:
        yield hf_config  # held here until the block ends: transformers keeps only a weak reference
    finally:
        unset_hf_deepspeed_config()


def check_lora_targets(train: TrainConfig, model_path: str) -> None:
    """Refuse train.lora.target_modules that match no module of the model at `model_path` (a directory or Hub
    id), before any stage: else every training worker fails, after the rollouts and weights. The model is
    built on the meta device, from its config alone. Where this machine cannot read that config (a cluster's
    shared volume, a Hub it cannot reach) or build the model (its code on the Hub, or a newer transformers on
    the workers), the workers' own load tells."""
    if not train.lora.enabled:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        # From this machine's files (a Hub model's record is in the cache by now): no wait for a Hub out of reach.
        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # whatever it is, the workers' own load tells it
        return
    try:
        with warnings.catch_warnings():  # the libraries' deprecations, which the workers show anyway
            warnings.simplefilter("ignore", FutureWarning)
            _with_lora(model, train)
    except ValueError as err:  # peft's NoMatchingPeftModuleError
        linear = sorted({name.rpartition(".")[2] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})
        raise ValueError(f"train.lora.target_modules: {err} The linear modules of {model_path}: {', '.join(linear)}") from None


def _with_lora(model: Any, train: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=train.lora.r,
        lora_alpha=train.lora.alpha,
        lora_dropout=train.lora.dropout,
        target_modules=train.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if train.gradient_checkpointing:
        model.enable_input_require_grads()  # else the frozen embeddings cut the checkpointed graph
    return model


def _checkpoints_progress(run: Path) -> list[dict[str, Any]]:
    """The progress records of the checkpoints on disk in the Ray Train run directory `run`, whether Ray Train
    recorded them or not (those it cannot read left out)."""
    progress = []
    for file in run.glob(f"checkpoint_*/{PROGRESS_FILE}"):
        with contextlib.suppress(OSError, ValueError):
            progress.append(json.loads(file.read_text()))
    return [entry for entry in progress if isinstance(entry, dict)]


def _saved_steps(progress: Sequence[dict[str, Any]]) -> list[int]:
    """The steps of the checkpoints whose `progress` records (_checkpoints_progress) are given, the final one's
    included (but where an earlier drift-ray wrote it without its step)."""
    return sorted(entry["step"] for entry in progress if type(entry.get("step")) is int)


def starting_point(progress: dict[str, Any], run: Path) -> str:
    """Where a training in the Ray Train run directory `run` starts, given the progress of the checkpoint
    recorded last there (_recorded_progress): said by the driver, so that run_dir's log tells a resumed
    training from one that starts again."""
    if progress.get("finished"):
        return f"the training in {run} reached its last step before it was stopped; its model is published from its final checkpoint"
    if "step" in progress:
        return f"resuming after step {progress['step']}, from the checkpoint recorded last in {run}"
    if run.is_dir():
        return f"training from step 0: the training in {run} was stopped before it recorded a checkpoint"
    return "training from step 0"


def _recorded_progress(run: Path) -> dict[str, Any] | None:
    """The progress record of the checkpoint that Ray Train recorded last in the run directory `run`, which a
    training there resumes from ({} for none; None where this Ray cannot read its record)."""
    import ray.train

    if not run.is_dir():
        return {}
    try:
        # Ray's INFO that it found the record is the controller's to say, as it resumes from it.
        with _level_of(logging.getLogger("ray.train"), logging.WARNING):
            checkpoint = ray.train.Result.from_path(run).checkpoint
    except NotImplementedError:  # a Ray Train that reads no run's record
        return None
    except RuntimeError:  # no record: a run stopped before Ray Train recorded anything
        return {}
    except OSError:
        raise
    except Exception as err:  # a record that names checkpoints removed since, or of another Ray version
        raise ValueError(
            f"{run}: Ray Train cannot resume the killed training there ({err}); remove that directory to train "
            "from the start"
        ) from err
    return _load_progress(checkpoint)


@contextlib.contextmanager
def _level_of(logger: logging.Logger, level: int) -> Iterator[None]:
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def unrecorded_checkpoints(saved_steps: Sequence[int], start_step: int) -> str | None:
    """What to say where checkpoints on disk are later than the one the run resumes from (`start_step`, 0 for
    none): Ray Train records a checkpoint as one to resume from a few seconds after it is saved (at its
    controller's next poll of the workers), and a run stopped in between resumes from an earlier one."""
    later = [step for step in saved_steps if step > start_step]
    if not later:
        return None
    resumes = f"resumes after step {start_step}" if start_step else "starts again from step 0"
    return (
        f"the checkpoint(s) of step(s) {', '.join(map(str, later))} were saved, but the run was stopped before Ray "
        f"Train recorded them (it records one a few seconds after it is saved), so this run {resumes} and trains "
        "those steps again"
    )


def _load_progress(checkpoint: Any) -> dict[str, Any]:
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as checkpoint_dir:
        return read_json_object(
            Path(checkpoint_dir) / PROGRESS_FILE,
            f"the checkpoint {checkpoint.path} is damaged: remove the training's {RUN_STORAGE_DIR} directory (under "
            "its output directory, such as run_dir/train) to train from the start",
        )


def _report_deepspeed_checkpoint(engine: Any, rank: int, metrics: dict[str, Any], progress: dict[str, Any]) -> None:
    """Every rank saves its DeepSpeed shards; Ray Train merges the ranks' directories into one checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as checkpoint_dir:
        engine.save_checkpoint(checkpoint_dir, tag=DEEPSPEED_TAG)
        if rank == 0:
            (Path(checkpoint_dir) / PROGRESS_FILE).write_text(json.dumps(progress))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))


def _report_final(
    engine: Any,
    tokenizer: Any,
    train: TrainConfig,
    rank: int,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
) -> None:
    """Rank 0 writes the trained model as save_pretrained does (LoRA merged unless lora.merge is off),
    with every step's metrics beside it."""
    import ray.train

    model = engine.module
    if engine.zero_optimization_partition_weights():
        # Each rank holds a slice of every parameter. DeepSpeed gathers them one module at a time into rank
        # 0's CPU memory, so no GPU ever holds the whole model (every rank must take part).
        state_dict = engine._zero3_consolidated_16bit_state_dict()
        model = _module_with_weights(model, state_dict) if rank == 0 else None
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as checkpoint_dir:
        if rank == 0:
            if train.lora.enabled and train.lora.merge:
                model = model.merge_and_unload()
            model.save_pretrained(Path(checkpoint_dir) / HF_CHECKPOINT_DIR)
            tokenizer.save_pretrained(Path(checkpoint_dir) / HF_CHECKPOINT_DIR)
            (Path(checkpoint_dir) / HF_CHECKPOINT_DIR / STEPS_FILE).write_text(
                "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
            )
            # Its step too: a rerun that Ray Train had not recorded it for names it (unrecorded_checkpoints).
            (Path(checkpoint_dir) / PROGRESS_FILE).write_text(json.dumps({"finished": True, "step": metrics["steps"]}))
        # After the save, which under ZeRO-3 holds the whole model in rank 0's memory.
        metrics = {**metrics, "peak_rss_mb": max(metrics["peak_rss_mb"], _peak_rss_mb_of_all_ranks(engine.device))}
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)


def _module_with_weights(module: Any, state_dict: dict[str, Any]) -> Any:
    """A CPU twin of `module` (a transformers model, or a PEFT model around one) holding `state_dict`'s
    tensors, to be saved: built on the meta device, so no memory is spent on weights that are replaced at
    once. Its non-persistent buffers (rotary frequencies) stay on meta: it cannot run a forward pass."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    peft_config = getattr(module, "peft_config", None)
    base = module.get_base_model() if peft_config else module
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(base.config)
        # from_config derives a generation config from config.json; the model's own (generation_config.json:
        # end-of-turn ids, sampling defaults) must be saved with it.
        twin.generation_config = copy.deepcopy(base.generation_config)
        if peft_config:
            from peft import get_peft_model

            twin = get_peft_model(twin, peft_config["default"])
    twin.load_state_dict(state_dict, assign=True)
    return twin
