"""Rollouts (and evaluation episodes): Ray Data streams problems through an actor pool of engines.

Each actor call plays all K episodes of a batch of problems (one engine call per turn) and writes them
as one Parquet shard, atomically, under the output directory, before returning a small summary row
per problem. So trajectories are durable as soon as they exist: a rerun of the same settings skips
the problems whose shard is already there, a killed run leaves only complete shards (temporary files
are never read), and a retried batch rewrites the same shard name instead of adding a second copy.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from drift_ray import schema
from drift_ray.config import Config, EngineKind, EpisodeConfig, RolloutConfig
from drift_ray.episode import EngineServerError, SamplingParams, episodes_table, first_messages, play_episodes, stable_seed
from drift_ray.prompts import Problem, problems_table
from drift_ray.trajectories import (
    TRAIN_SETTINGS_FILE,
    exclusive_lock,
    digest_files,
    files_fingerprint,
    read_json_object,
    RERUN_REMEDY,
    require_same_settings,
    write_json_atomic,
    write_table_atomic,
)
from drift_ray.verifiers import get_verifier, verifier_settings

log = logging.getLogger(__name__)

SHARD_GLOB = "part-*.parquet"
# The record of what played the episodes in a directory of shards; its "_" keeps Parquet readers of the
# directory (pyarrow, pandas, Ray Data) from taking it for a shard, as they skip such names.
MANIFEST = "_manifest.json"
MANIFEST_BEFORE = "manifest.json"  # the name earlier drift-ray versions gave it, still read where it is
SUMMARY_SCHEMA = pa.schema(
    [
        (schema.PROMPT_ID, pa.string()),
        ("trajectories", pa.int64()),
        ("solved", pa.int64()),
        (schema.PROMPT_TOKENS, pa.int64()),
        (schema.COMPLETION_TOKENS, pa.int64()),
        ("seconds", pa.float64()),
        ("server_error", pa.string()),  # why the batch was not played (EngineServerError), else null
    ]
)


def rollout_sampling(cfg: Config) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens, seed=cfg.seed)


def eval_sampling(cfg: Config) -> SamplingParams:
    """Greedy decoding, as the paper evaluates."""
    return SamplingParams(temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens)


class EpisodeStage:
    """`Dataset.map_batches` callable: problem rows in, one summary row per problem out.

    Input columns: prompt_id, question, gold, metadata. The trajectories themselves go to
    `out_dir/part-<hash of the batch's prompt ids>.parquet` (schema.TRAJECTORY_SCHEMA).
    """

    def __init__(
        self,
        *,
        model: str,
        rollout: RolloutConfig,
        episode: EpisodeConfig,
        verifier: str,
        verifier_options: Mapping[str, Any],
        params: SamplingParams,
        samples_per_prompt: int,
        out_dir: str,
    ):
        from drift_ray.engines import build_engine  # heavy (torch/transformers/vllm): only inside the actor

        self.engine = build_engine(rollout, model=model)
        self.model = model
        self.episode = episode
        self.verifier = get_verifier(verifier, **verifier_options)
        self.params = params
        self.samples_per_prompt = samples_per_prompt
        self.out_dir = Path(out_dir)
        self.server_error: str | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        schema.require_columns(batch.column_names, (schema.PROMPT_ID, schema.QUESTION, schema.GOLD), stage="rollout", source="problem batch")
        problems = [Problem.from_row(row) for row in batch.to_pylist()]
        # The driver reports a server's failure itself, from these rows: raised here, it would reach the user
        # inside a traceback of Ray's. Once this actor's server has failed, its later batches are not tried.
        if self.server_error is None:
            start = time.perf_counter()
            try:
                episodes = play_episodes(problems, self.engine, self.verifier, self.params, self.samples_per_prompt, self.episode)
            except EngineServerError as err:
                self.server_error = str(err)
            else:
                seconds = time.perf_counter() - start
                trajectories = episodes_table(episodes, self.episode, self.model)
                write_table_atomic(trajectories, shard_path(self.out_dir, problems))
                return summarize(problems, trajectories, seconds)
        rows = [{schema.PROMPT_ID: p.prompt_id, "server_error": self.server_error} for p in problems]
        return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


def shard_path(out_dir: Path, problems: Sequence[Problem]) -> Path:
    key = stable_seed(*(p.prompt_id for p in problems))
    return out_dir / f"part-{key:016x}.parquet"


def summarize(problems: Sequence[Problem], trajectories: pa.Table, seconds: float) -> pa.Table:
    """One row per problem: its trajectories, how many were solved, their tokens, its share of the seconds."""
    by_prompt: dict[str, dict[str, Any]] = {
        p.prompt_id: {"trajectories": 0, "solved": 0, schema.PROMPT_TOKENS: 0, schema.COMPLETION_TOKENS: 0}
        for p in problems
    }
    columns = trajectories.select([schema.PROMPT_ID, schema.T_STAR, schema.PROMPT_TOKENS, schema.COMPLETION_TOKENS])
    for prompt_id, t_star, prompt_tokens, completion_tokens in zip(*columns.to_pydict().values()):
        entry = by_prompt[prompt_id]
        entry["trajectories"] += 1
        entry["solved"] += t_star is not None
        entry[schema.PROMPT_TOKENS] += prompt_tokens
        entry[schema.COMPLETION_TOKENS] += completion_tokens
    share = seconds / max(len(problems), 1)
    return pa.Table.from_pylist(
        [{schema.PROMPT_ID: pid, **entry, "seconds": share} for pid, entry in by_prompt.items()], schema=SUMMARY_SCHEMA
    )


def completed_prompts(
    out_dir: str | Path, problems: Sequence[Problem], samples_per_prompt: int, episode: EpisodeConfig
) -> set[str]:
    """Ids of `problems` whose K trajectories are already in complete shards of `out_dir`.

    The ids of built-in and hub tasks are positions in a split, so another task config (its options or
    the seed) can give an id to another problem: each reused prompt's stored gold and opening messages
    must be the problem's, else the rerun is refused instead of reusing another problem's episodes.
    """
    out_dir = Path(out_dir)
    wanted = {p.prompt_id: p for p in problems}
    counts: dict[str, int] = {}
    holders: dict[str, list[str]] = {}  # the shards that hold each prompt's trajectories
    for shard in sorted(out_dir.glob(SHARD_GLOB)):
        ids = _read_shard(shard, columns=[schema.PROMPT_ID]).column(0).to_pylist()
        for prompt_id in dict.fromkeys(ids):
            holders.setdefault(prompt_id, []).append(shard.name)
        first_rows: dict[str, int] = {}
        for row, prompt_id in enumerate(ids):
            counts[prompt_id] = counts.get(prompt_id, 0) + 1
            if prompt_id in wanted:
                first_rows.setdefault(prompt_id, row)
        if first_rows:
            stored = _read_shard(shard, columns=[schema.GOLD, schema.MESSAGES]).take(list(first_rows.values()))
            for prompt_id, gold, messages in zip(first_rows, *stored.to_pydict().values()):
                _require_same_problem(shard, wanted[prompt_id], gold, messages, episode)
    bad = {pid: n for pid, n in counts.items() if n != samples_per_prompt}
    if bad:
        pid, n = next(iter(bad.items()))
        # The manifest guards K: a shard copied in from elsewhere, or a prompt played into two shards.
        raise RuntimeError(
            f"{out_dir}: prompt {pid!r} has {n} trajectories, expected {samples_per_prompt} "
            f"(rollout.samples_per_prompt), in {', '.join(holders[pid])} ({len(bad)} such prompts); remove "
            "the shards that do not belong there (their prompts are played again), or use a new directory"
        )
    return set(counts) & set(wanted)


def rollouts_fingerprint(out_dir: str | Path, prompt_ids: Collection[str]) -> str:
    """A digest of the shards of `out_dir` that hold trajectories of `prompt_ids`, by their files: rollouts
    played again (a shard removed and its prompts replayed, say after the task file changed) are other
    rollouts under the same settings, while shards that other runs add to a shared rollout.output_dir for
    prompts of their own change nothing."""
    wanted = set(prompt_ids)
    shards = {
        shard.name: shard
        for shard in sorted(Path(out_dir).glob(SHARD_GLOB))
        if not wanted.isdisjoint(_read_shard(shard, columns=[schema.PROMPT_ID]).column(0).to_pylist())
    }
    return digest_files(shards)


def _require_same_problem(
    shard: Path, problem: Problem, gold: str, messages: list[dict[str, str]], episode: EpisodeConfig
) -> None:
    opening = first_messages(problem.question, episode)
    differs = [
        name
        for name, same in (("gold", gold == problem.gold), ("question", messages[: len(opening)] == opening))
        if not same
    ]
    if differs:
        golds = f"; gold {schema.short_repr(gold)} then, {schema.short_repr(problem.gold)} now" if "gold" in differs else ""
        raise RuntimeError(
            f"{shard}: prompt {problem.prompt_id!r} was played on another problem (its {' and '.join(differs)} "
            f"{'differ' if len(differs) > 1 else 'differs'} from the task's now{golds}): the task changed (task.* or "
            f"seed) since these episodes were played. {RERUN_REMEDY}"
        )


def trained_by(model: str) -> dict[str, Any] | None:
    """The settings weighted SFT recorded in the model directory `model`, or None."""
    record = Path(model) / TRAIN_SETTINGS_FILE
    if not record.is_file():
        return None
    # Its content identifies the policy in the manifest: a damaged one would be another policy's.
    return read_json_object(record, f"it records what trained {model}: train it again, or restore that file")


def manifest_file(out_dir: str | Path) -> Path:
    """The manifest of the shards in `out_dir`: MANIFEST, or where only an earlier drift-ray's is there,
    MANIFEST_BEFORE (which guards its shards as well)."""
    out_dir = Path(out_dir)
    before = out_dir / MANIFEST_BEFORE
    return before if before.exists() and not (out_dir / MANIFEST).exists() else out_dir / MANIFEST


def _manifest_guards(out_dir: Path) -> bool:
    # A manifest beside no shard guards nothing (a run that failed before its first batch, say on a
    # mistyped model): it is replaced, so that the corrected config can use the directory.
    return manifest_file(out_dir).exists() and any(out_dir.glob(SHARD_GLOB))


def check_manifest(
    out_dir: Path,
    settings: dict[str, Any],
    remedy: str = RERUN_REMEDY,
    ignore: Collection[str] = (),
    meanings: Mapping[str, str] | None = None,
) -> None:
    """Refuse to add trajectories of `settings` to those of other settings in `out_dir`, saying `remedy`;
    the settings under `ignore` are not compared; `meanings` as require_same_settings takes them."""
    if _manifest_guards(out_dir):
        # A local model is known by its files: at another path (its run_dir moved, or spelled otherwise) it
        # is the same policy.
        require_same_settings(
            manifest_file(out_dir),
            settings,
            output=str(out_dir),
            known_by={"model": "model_fingerprint"},
            inputs=["model_fingerprint", "model_trained_by"],  # a model replaced at the same path
            absent_means={"engine.max_model_len": None},  # recorded since: before, every engine held the model's
            remedy=remedy,
            ignore=ignore,
            meanings=meanings,
            follows={"verifier_options": "verifier"},  # the defaults of another verifier's options
        )


def record_manifest(out_dir: Path, settings: dict[str, Any]) -> None:
    """Record `settings` as those of the trajectories in `out_dir`, unless its shards have theirs already."""
    if not _manifest_guards(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(settings, out_dir / MANIFEST)
        (out_dir / MANIFEST_BEFORE).unlink(missing_ok=True)  # an earlier drift-ray's, which guarded nothing


def rollouts_lock_file(out_dir: str | Path) -> Path:
    """The lock of the runs that play episodes into `out_dir`: beside it, so that a run that fails before
    playing leaves no directory; of the resolved path, so that every spelling of it names one lock."""
    out_dir = Path(out_dir).resolve()
    return out_dir.parent / f".{out_dir.name}.play.lock"


def engine_identity(rollout: RolloutConfig) -> dict[str, Any]:
    """What, beside the model, decides the episodes an engine plays. Another engine samples (and another
    device, dtype or tensor-parallel split computes) the same policy otherwise: its episodes would not replay from
    the seeds, and greedy ones can differ. A served model is known by its name alone: another server may
    serve another model under it."""
    identity: dict[str, Any] = {"kind": rollout.engine.value, "dtype": rollout.dtype, "max_model_len": rollout.max_model_len}
    if rollout.engine is EngineKind.transformers:
        identity["device"] = rollout.transformers_device
    if rollout.engine is EngineKind.vllm:
        identity["tensor_parallel_size"] = rollout.tensor_parallel_size
    if rollout.engine is EngineKind.openai:
        identity["api_base"] = rollout.api_base.rstrip("/")  # as the engine joins it to its path
    return identity


# The settings of a manifest that name the policy; play_settings are the others.
MODEL_SETTINGS = ("model", "model_trained_by", "model_fingerprint")


def play_settings(
    cfg: Config, verifier: str, verifier_options: Mapping[str, Any], params: SamplingParams, samples_per_prompt: int
) -> dict[str, Any]:
    """What, beside the policy, a manifest records as deciding the episodes in its directory."""
    return {
        "engine": engine_identity(cfg.rollout),
        "samples_per_prompt": samples_per_prompt,
        "sampling": asdict(params),
        "episode": cfg.episode.model_dump(mode="json"),
        "verifier": verifier,
        "verifier_options": verifier_settings(verifier, verifier_options),
    }


def run_episodes(
    problems: Sequence[Problem],
    out_dir: str | Path,
    *,
    model: str,
    cfg: Config,
    verifier: str,
    verifier_options: Mapping[str, Any],
    params: SamplingParams,
    samples_per_prompt: int,
    prompts_per_batch: int,
    num_actors: int,
    start_ray: Callable[[], None] | None = None,
    other_settings_remedy: str = RERUN_REMEDY,
) -> dict[str, Any]:
    """Play every problem not yet in `out_dir` through a Ray Data actor pool; return a run summary.

    Needs a running Ray (see pipeline.connect_ray), or `start_ray`, called only when there are episodes to
    play, so that a rerun with nothing left to do starts none. Returns counts of new and reused problems,
    generated tokens and wall-clock seconds.
    """
    import ray.data

    out_dir = Path(out_dir)
    settings = {
        "model": model,
        # What made a model weighted SFT wrote (None for any other): a model retrained at the same path
        # is another policy.
        "model_trained_by": trained_by(model),
        # Any local model replaced at the same path, whoever trained it.
        "model_fingerprint": files_fingerprint(model),
        **play_settings(cfg, verifier, verifier_options, params, samples_per_prompt),
    }

    def left_to_play() -> list[Problem]:
        check_manifest(out_dir, settings, other_settings_remedy)
        done = completed_prompts(out_dir, problems, samples_per_prompt, cfg.episode)
        return [p for p in problems if p.prompt_id not in done]

    todo, waited = left_to_play(), 0.0
    with contextlib.ExitStack() as turn:
        if todo:
            # Runs that share a rollout.output_dir take turns at playing: the one that waited reuses what
            # the other played, instead of playing those prompts in batches of its own, which would put them
            # in two shards. A run with nothing to play only reads: it neither waits nor writes a lock.
            waited = turn.enter_context(exclusive_lock(rollouts_lock_file(out_dir)))
            todo = left_to_play()
        if todo and start_ray:
            start_ray()  # before the directory is made: a cluster that cannot run the actors leaves none
        record_manifest(out_dir, settings)
        if todo and len(todo) < len(problems):  # else a resumed run says so only in its summary, at the end
            log.info(
                "%s: %d of the %d problems were played already; playing the other %d",
                out_dir, len(problems) - len(todo), len(problems), len(todo),
            )
        summary: dict[str, Any] = {
            "problems": len(problems), "reused": len(problems) - len(todo), "new": len(todo),
            "waited_seconds": waited,
        }
        start = time.perf_counter()
        if todo:
            r = cfg.rollout
            # One block per batch, so every actor of the pool gets inputs (a single block feeds one actor).
            table = problems_table(todo)
            blocks = [table.slice(i, prompts_per_batch) for i in range(0, len(todo), prompts_per_batch)]
            ds = ray.data.from_arrow(blocks).map_batches(
                EpisodeStage,
                fn_constructor_kwargs={
                    "model": model,
                    "rollout": r,
                    "episode": cfg.episode,
                    "verifier": verifier,
                    "verifier_options": dict(verifier_options),
                    "params": params,
                    "samples_per_prompt": samples_per_prompt,
                    "out_dir": str(out_dir),
                },
                batch_size=prompts_per_batch,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=num_actors),
                num_cpus=r.cpus_per_actor,
                num_gpus=r.gpus_per_actor,
                resources=r.resources or None,
            )
            produced = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
            failed = produced.filter(pc.is_valid(produced["server_error"]))
            if failed.num_rows:
                raise EngineServerError(
                    f"{failed['server_error'][0]} ({failed.num_rows} of the {len(todo)} problems were not played; those "
                    f"played are kept in {out_dir}, and a rerun plays the rest)"
                )
            seen = completed_prompts(out_dir, todo, samples_per_prompt, cfg.episode)  # the shards' gold, messages: of todo
            unseen = [p for p in todo if p.prompt_id not in seen]
            if unseen:
                raise RuntimeError(
                    f"{out_dir}: the rollout actors played {len(todo)} problems, but this process finds the episodes "
                    f"of {len(unseen)} of them nowhere there (e.g. {unseen[0].prompt_id!r}): an actor on another "
                    "node wrote them to that node's own disk. On a cluster of several nodes, run_dir (and "
                    "rollout.output_dir) must be storage that every node mounts at the same path (cluster/README.md)"
                )
            summary.update(
                trajectories=int(pc.sum(produced["trajectories"]).as_py()),
                completion_tokens=int(pc.sum(produced[schema.COMPLETION_TOKENS]).as_py()),
                prompt_tokens=int(pc.sum(produced[schema.PROMPT_TOKENS]).as_py()),
            )
        summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def _read_shard(shard: Path, columns: list[str] | None = None) -> pa.Table:
    """The trajectories of `shard` (only `columns`, when given), refused by name unless the shard holds every
    column of the trajectory schema and the columns read cast to its types."""
    remedy = "Remove it to have its prompts played again."
    try:
        # Read with the schema, Arrow would fill a missing column with nulls: metrics computed on null verdicts
        # would look like those of episodes that all failed.
        found = pq.read_schema(shard).names
        required = [name for name in schema.TRAJECTORY_SCHEMA.names if name not in schema.ADDED_LATER]
        schema.require_columns(found, required, stage="rollouts", source=str(shard), remedy=remedy)
        return pq.read_table(shard, columns=columns, schema=schema.TRAJECTORY_SCHEMA)
    except pa.ArrowException as err:
        raise ValueError(f"{shard}: cannot be read as trajectories ({err}). {remedy}") from err


def read_shards(out_dir: str | Path, prompt_ids: Collection[str] | None = None) -> pa.Table:
    """The trajectories of complete shards in `out_dir` (of `prompt_ids` only, when given), sorted by prompt
    id and then sample index."""
    shards = sorted(Path(out_dir).glob(SHARD_GLOB))
    if not shards:
        raise FileNotFoundError(f"{out_dir}: no trajectory shards ({SHARD_GLOB}); run the rollouts first")
    table = pa.concat_tables([_read_shard(s) for s in shards])
    if prompt_ids is not None:
        table = table.filter(pc.is_in(table[schema.PROMPT_ID], value_set=pa.array(list(prompt_ids), pa.string())))
    return table.sort_by([(schema.PROMPT_ID, "ascending"), (schema.SAMPLE_INDEX, "ascending")])
