"""The DRIFT recipe: prompts → rollouts → weights → weighted SFT → evaluation, in one Ray driver.

Every stage writes its output under `run_dir` and is skipped on a rerun when that output is complete,
so a killed job resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence
from urllib.parse import urlparse

import pyarrow.parquet as pq

from drift_ray.config import DEMO_MODEL, Config, EngineKind, TaskConfig
from drift_ray.prompts import Task, load_task, shared_questions, task_label
from drift_ray.rollouts import (
    MODEL_SETTINGS,
    SHARD_GLOB,
    check_manifest,
    eval_sampling,
    manifest_file,
    play_settings,
    read_shards,
    rollout_sampling,
    rollouts_fingerprint,
    run_episodes,
)
from drift_ray.schema import PROMPT_ID, TRAJECTORY_SCHEMA
from drift_ray.signals import handled_as_before, terminated
from drift_ray.trajectories import (
    RERUN_REMEDY,
    exclusive_lock,
    publish_directory,
    read_json_object,
    require_same_settings,
    write_json_atomic,
)

log = logging.getLogger("drift_ray")

CONFIG_FILE = "config.json"  # the config of the last `run` that finished, to rerun it
# The record of the last `run` that finished, in one file so that its parts always come from one run:
# "config"; "timings_s", wall-clock seconds per stage; "work_by_round", what the stages of every round
# took over from earlier runs, so that their seconds can be told from a cost: the rollouts' summary
# (prompts "reused" and "new", tokens, seconds, and those it waited for its turn at a shared rollouts
# directory), whether the weights and the model were finished already, and the steps an earlier, killed
# training had done (all of them when it was killed after training, before the model was published); and
# "metrics", the run's evaluation per model (eval/eval.json is rewritten by any `drift-ray eval` there).
RUN_RECORD_FILE = "run.json"
WEIGHTED_DIR = "weighted"  # in run_dir: the weighted rollouts, training's input
TRAIN_DIR = "train"  # in run_dir: weighted SFT's checkpoints and model
# Inside WEIGHTED_DIR, published with it: no file beside it (`drift-ray weights --output run_dir/weighted.parquet`
# writes weighted.diagnostics.json) can mark it finished or stand for its records. Their "_" keeps Parquet
# readers of the directory (pyarrow, pandas) off them; Ray Data reads only *.parquet.
WEIGHTS_DIAGNOSTICS_FILE = "_diagnostics.json"
WEIGHTS_SETTINGS_FILE = "_settings.json"  # what made the weighted rollouts: weights config, rollouts, prompts
RUN_LOCK_FILE = ".drift-ray.lock"  # in run_dir: held by the process writing it, naming that process
# In run_dir: the drift-ray lines of every command that held it, appended, and how each ended; on the console
# they scroll away among Ray's (the actors' and workers' own lines are in Ray's session logs).
RUN_LOG_FILE = "drift-ray.log"


STAGES = ("rollouts", "train", "eval")  # the stages that run on Ray, for connect_ray's check


# Ray's, where it is free: a local cluster's dashboard serves there as it would by Ray's default.
DEFAULT_DASHBOARD_PORT = 8265

# Set by Ray for the entrypoint of a submitted job: JSON holding the job's runtime_env.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


@contextlib.contextmanager
def lock_run_dir(cfg: Config, command: str, *, writes_rollouts: bool) -> Iterator[None]:
    """Held while a process writes cfg.run_dir (made if new): a second one, such as a job resubmitted while
    the first still runs, is refused at once instead of overwriting the stages the first is writing.
    Warns first of a relative run_dir, and rollout.output_dir where the command `writes_rollouts`, that a
    Ray job would leave in its working_dir (see outputs_left_in_the_job). Meanwhile drift-ray's log goes to
    RUN_LOG_FILE in run_dir too, headed by `command` (the drift-ray command's name)."""
    outputs = {"run_dir": cfg.run_dir, **({"rollout.output_dir": cfg.rollout.output_dir} if writes_rollouts else {})}
    warn_of_outputs_left_in_the_job(outputs)
    try:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:  # its message names the path, not the key that set it
        raise OSError(f"run_dir={cfg.run_dir}: cannot make the directory ({err.strerror})") from err
    run_dir = Path(cfg.run_dir)
    with exclusive_lock(run_dir / RUN_LOCK_FILE, wait=False), _logged_to(run_dir / RUN_LOG_FILE, command):
        yield


@contextlib.contextmanager
def _logged_to(file: Path, command: str) -> Iterator[None]:
    """Within: drift-ray's log records go to `file` too (appended), and then how the command ended."""
    unended = _command_that_left_no_end(file)
    handler = logging.FileHandler(file, encoding="utf-8")
    # The pid: on a file system that takes no locks (see exclusive_lock), two commands' lines may mix.
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
    log.addHandler(handler)  # at the level the process logs at, as the console shows it
    # Not the command line: an override's value may be a secret (see config._NEVER_SHOWN). Whatever the level
    # the process logs at: the next command finds where this one's lines begin by it.
    header = (command, os.getpid(), socket.gethostname(), file)
    log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, _COMMAND_HEADER_FORMAT, header, None))
    if unended:
        log.warning(
            "the command before this one here (%s) stopped without a line saying how: it was killed (SIGKILL, out of "
            "memory) or its machine stopped; what it finished is kept",
            unended,
        )

    def ended(level: int, how: str) -> None:  # in the file alone: the command says it on the console
        handler.handle(log.makeRecord(log.name, level, __file__, 0, "ended: %s", (how,), None))

    try:
        yield
    except KeyboardInterrupt as interrupt:  # SIGTERM's too
        ended(logging.ERROR, f"{'terminated' if terminated(interrupt) else 'interrupted'}; run the same command again to go on")
        raise
    except BaseException as err:
        ended(logging.ERROR, f"{type(err).__name__}: {err}")
        raise
    else:
        ended(logging.INFO, "finished")
    finally:
        log.removeHandler(handler)
        handler.close()


# The line _logged_to heads a command's lines with, and the pattern that finds it in the file.
_COMMAND_HEADER_FORMAT = "drift-ray %s, pid %d on %s: logging to %s"
_COMMAND_HEADER = re.compile(r" drift_ray INFO drift-ray (.+?), pid (\d+) on (\S+): logging to ")


def _command_that_left_no_end(file: Path) -> str | None:
    """'drift-ray COMMAND, pid N on HOST' of the command that logged to `file` last where it left no line saying
    how it ended (killed), else None. Read from the file's end: a header more than 64 KiB back is not looked for."""
    try:
        with file.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 65536))
            tail = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    headers = list(_COMMAND_HEADER.finditer(tail))
    if not headers:
        return None
    command, pid, host = headers[-1].groups()
    # Its own end line (by its pid: on a file system without locks, another command's lines may come between).
    if re.compile(rf"^\S+ \S+ {pid} drift_ray (?:INFO|ERROR) ended: ", re.M).search(tail, headers[-1].end()):
        return None
    if host == socket.gethostname() and _alive(int(pid)):  # still running beside this one, unlocked
        return None
    return f"drift-ray {command}, pid {pid} on {host}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def warn_of_outputs_left_in_the_job(outputs: Mapping[str, str | None]) -> None:
    for problem in outputs_left_in_the_job(outputs, os.environ):
        log.warning(problem)


def outputs_left_in_the_job(outputs: Mapping[str, str | None], environ: Mapping[str, str]) -> list[str]:
    """Why each relative path of `outputs` (by the key or flag that sets it) would be lost, where `environ`
    is that of a Ray job submitted with a working_dir that Ray copies (all but a local:// one, used in place):
    the job starts in the copy, kept by the content it was uploaded with, under the cluster's session
    directory, and Ray deletes unused copies when they outgrow their cache."""
    try:
        working_dir = json.loads(environ.get(RAY_JOB_CONFIG_ENV) or "{}").get("runtime_env", {}).get("working_dir")
    except (ValueError, AttributeError):  # not Ray's JSON: no job of Ray's to speak of
        return []
    if not working_dir or urlparse(working_dir).scheme == "local":
        return []
    return [
        f"{key}={path} is relative to the directory this process runs in ({Path.cwd()}), in a Ray job submitted "
        "with a working_dir Ray's copy of it unless the entrypoint changed directory: a job submitted with other "
        "files, or after the cluster restarts, gets another copy (so a rerun would not find this run to resume), "
        f"and Ray may delete this one once the job ends. Give an absolute {key} on storage that outlives the job"
        for key, path in outputs.items()
        if path and not Path(path).is_absolute()
    ]


def cluster_address(cfg: Config) -> str | None:
    """The Ray cluster a command joins (`ray.address`, else RAY_ADDRESS), or None: it starts one of its own."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def connect_ray(cfg: Config, stages: Collection[str] = STAGES) -> None:
    """Join the cluster of `ray.address` or RAY_ADDRESS (as under `ray job submit`), else start a local one;
    nothing when Ray runs already. The stages below call it (as their `start_ray`) only when they have work,
    so a rerun with nothing left to do starts no Ray.

    A local cluster that cannot run `stages` as configured is shut down again with an error naming the
    settings (see local_cluster_shortfalls): else Ray would wait for the missing resources forever.
    """
    import ray

    if ray.is_initialized():
        return
    # ray.init replaces the SIGTERM handler with one in C that prints a stack dump before calling its own,
    # which ends the process with SystemExit: a `kill` would read as a crash, during ray.init too (the drift-ray
    # command's handler ends it as Ctrl-C does).
    with handled_as_before(signal.SIGTERM):
        _init_ray(cfg, stages)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def _init_ray(cfg: Config, stages: Collection[str]) -> None:
    import ray

    address = cluster_address(cfg)
    if address:
        if cfg.ray.num_cpus:  # said, not refused: one config serves a local run and `ray job submit` alike
            log.info(
                "ray: joining a running cluster (ray.address or RAY_ADDRESS); ray.num_cpus=%d sizes only a cluster "
                "of this run's own, so it is not used",
                cfg.ray.num_cpus,
            )
        ray.init(address=address, log_to_driver=True)
    else:
        start_local_ray(cfg.ray.num_cpus)
        shortfalls = local_cluster_shortfalls(cfg, stages, ray.cluster_resources())
        if shortfalls:
            ray.shutdown()
            raise ValueError(
                "the local Ray cluster cannot run this config, and it does not grow: "
                + "; ".join(shortfalls)
                + ". Lower these settings, run on a machine that has what they ask for, or join a cluster that "
                "has it (ray.address or RAY_ADDRESS)"
            )


def start_local_ray(num_cpus: int | None, **init_options: Any) -> None:
    """A new local cluster of `num_cpus` ("local": even where `ray start` runs one on this machine, which a bare
    ray.init() would join, and refuse num_cpus for), whose processes ask its own dashboard of its state;
    `init_options` go to ray.init as they are (the benchmarks' quieter logging).

    Ray Train's placement-group cleaner asks the State API, which the dashboard serves, whether the training's
    controller lives. It asks the API that RAY_API_SERVER_ADDRESS names; else, beside another cluster on this
    machine, it fails with a traceback, or asks the cluster that `ray start` ran, finds no such controller
    there, and may remove the placement group of a training that runs, which then dies. So the dashboard's
    port is chosen first, and the variable names it; a dashboard that another process took the port from
    in the meantime (another command starting beside this one) is started again on another port, for the
    variable must name this cluster's dashboard and no other.
    """
    import ray

    init: dict[str, Any] = dict(address="local", num_cpus=num_cpus, log_to_driver=True) | init_options
    for preferred in (DEFAULT_DASHBOARD_PORT, 0, 0):
        port = _free_port(preferred)
        if port is None:
            why = "this machine has no IPv4 loopback for its dashboard"
            break
        url = f"127.0.0.1:{port}"
        context = ray.init(
            **init, dashboard_host="127.0.0.1", dashboard_port=port, runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://{url}"}}
        )
        # The dashboard writes its address once it serves. Under RAY_OVERRIDE_DASHBOARD_URL (a dashboard behind a
        # proxy) the context holds that URL instead, where the dashboard started.
        if context.dashboard_url == url or (context.dashboard_url and "RAY_OVERRIDE_DASHBOARD_URL" in os.environ):
            return
        ray.shutdown()
        if _free_port(port) == port:  # nobody took it: the dashboard failed otherwise, and would fail again
            why = "its dashboard did not start (Ray's error above says why)"
            break
        log.info(
            "ray: another process took port %d while the local cluster's dashboard started there; starting the "
            "cluster again with its dashboard on another port",
            port,
        )
    else:
        why = "other processes took each port chosen for its dashboard"
    log.warning(
        "ray: the local cluster's processes are not told where its dashboard is (%s): Ray Train's placement-group "
        "cleaner may ask another Ray cluster on this machine whether the training lives, and end it",
        why,
    )
    ray.init(**init)


def _free_port(preferred: int) -> int | None:
    """`preferred` where this machine's IPv4 loopback has it free (as Ray's dashboard binds it), else a port the
    system hands out; None without an IPv4 loopback."""
    for port in (preferred, 0):
        try:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to a server
                probe.bind(("127.0.0.1", port))
                return probe.getsockname()[1]
        except OSError:
            continue
    return None


def local_cluster_shortfalls(cfg: Config, stages: Collection[str], available: Mapping[str, float]) -> list[str]:
    """What a local Ray cluster with `available` resources (ray.cluster_resources()) lacks to run `stages`
    (of STAGES), one message per resource, naming the settings that ask for it.

    The rollout and evaluation actor pools need one actor to fit (Ray Data runs the actors that fit); Ray
    Train needs all its workers at once.
    """
    r, t = cfg.rollout, cfg.train
    # As rollouts.run_episodes and train.train_weighted_sft ask Ray for them; a custom resource of the same
    # name as CPU or GPU replaces it there too.
    actor = {"CPU": (r.cpus_per_actor, "rollout.cpus_per_actor"), "GPU": (r.gpus_per_actor, "rollout.gpus_per_actor")}
    actor.update({name: (amount, f"rollout.resources.{name}") for name, amount in r.resources.items()})
    workers = f"× train.num_workers={t.num_workers}"
    worker = {
        "CPU": (t.cpus_per_worker * t.num_workers, f"train.cpus_per_worker={t.cpus_per_worker:g} {workers}"),
        "GPU": (t.num_workers if t.use_gpu else 0, f"train.use_gpu=true: one per worker {workers}"),
    }
    worker.update(
        {name: (amount * t.num_workers, f"train.resources.{name}={amount:g} {workers}") for name, amount in t.resources.items()}
    )
    demands = []
    if {"rollouts", "eval"} & set(stages):
        demands.append(("one rollout or evaluation actor needs", actor))
    if "train" in stages:
        demands.append(("the training workers need", worker))
    cpus_from = "ray.num_cpus" if cfg.ray.num_cpus else "all of this machine's"
    shortfalls = []
    for who, needs in demands:
        for resource, (amount, setting) in needs.items():
            have = available.get(resource, 0.0)
            if round(amount * 10_000) > round(have * 10_000):  # Ray counts resources in steps of 1e-4
                source = f" ({cpus_from})" if resource == "CPU" else ""
                shortfalls.append(f"{who} {resource} {amount:g} ({setting}), the cluster has {have:g}{source}")
    return shortfalls


def stages_left(first_stage: str, round_index: int, rounds: int) -> tuple[str, ...]:
    """The stages (of STAGES) a local cluster must run when `first_stage` of round `round_index` of
    `rounds` is the first with work: the stages before it are finished, so it and those after it, and
    every stage while a later round remains. A run that trained on a larger cluster may still evaluate
    on a smaller one."""
    return STAGES[STAGES.index(first_stage):] if round_index == rounds else STAGES


def cache_dir() -> Path:
    return Path(os.environ.get("DRIFT_RAY_CACHE", Path.home() / ".cache" / "drift_ray"))


def resolve_model(model: str, cfg: Config, *, to_train: bool = False) -> str:
    """A loadable model path or id; 'builtin:demo' builds (once, cached) the tiny demo reference.

    Refused as check_model_here refuses, then a Hub id that neither the Hub nor its local cache holds (see
    _require_hub_model), and a model `to_train` that train.lora.target_modules matches nothing of.
    """
    on_the_hub = check_model_here(model, cfg, to_train=to_train)
    if model == DEMO_MODEL:
        from drift_ray.demo_model import ensure_demo_model

        model = ensure_demo_model(cache_dir() / "models", seed=cfg.seed, episode=cfg.episode)
    elif cfg.rollout.engine is EngineKind.openai and not to_train:
        return model
    model = os.path.expanduser(model)
    if on_the_hub:
        _require_hub_model(model, cfg, to_train=to_train)
    if to_train:
        from drift_ray.train import check_lora_targets  # not at the top: it imports torch

        check_lora_targets(cfg.train, model)
    return model


def check_model_here(model: str, cfg: Config, *, to_train: bool = False) -> bool:
    """Refuse a model that this machine's files tell cannot load; whether it is a Hub id to look up. It reads
    no network and builds nothing, so commands run it before they load a task (a Hub download).

    A path that is not here and cannot be a Hub id ('name' or 'namespace/name'), such as a mistyped
    runs/a/train/modle, fails now, not inside a rollout actor or training worker; so does a directory that
    holds no model. On a cluster the command joins, an absolute path may exist on the workers only (a shared
    volume), and is left to them; a server's model name (rollout.engine=openai) is the server's to check,
    except for a model `to_train`, which the training workers load.
    """
    if not model.strip():
        raise ValueError("the model is empty: give a model directory or a Hub id")
    if model == DEMO_MODEL and cfg.rollout.engine is EngineKind.openai and not to_train:
        # Else the demo model would be built here, and its path sent to the server as a model name.
        raise ValueError(
            f"rollout.model: {DEMO_MODEL} is built for the local engines; with rollout.engine=openai give the name "
            "the server serves its model under (rollout.model, or --model for drift-ray eval)"
        )
    if model == DEMO_MODEL or (cfg.rollout.engine is EngineKind.openai and not to_train):
        return False
    model = os.path.expanduser(model)
    absolute = os.path.isabs(model)
    hub_id = not absolute and model.count("/") <= 1 and not model.startswith((".", "~"))
    here = os.path.exists(model)
    if not (here or hub_id or (absolute and cluster_address(cfg))):
        raise ValueError(
            f"{model}: no such model directory"
            + ("" if absolute else ", nor a Hub id ('name' or 'namespace/name')")
            + _models_named_like(model)
        )
    if here and (problem := _not_a_model(Path(model))):
        inner = _model_within(Path(model))
        raise ValueError(f"{model}: not a model directory ({problem})" + (f"; did you mean {inner}?" if inner else ""))
    if here and (Path(model) / "config.json").is_file():
        if problem := _tokenizer_problem(model, os.stat(model).st_mtime_ns):
            raise ValueError(f"{model}: {problem}")
    if here and to_train and (Path(model) / ADAPTER_RECORD).is_file():
        _refuse_to_train_an_adapter(model, Path(model))
    return hub_id and not here


def _refuse_to_train_an_adapter(model: str, directory: Path) -> None:
    """transformers loads a LoRA adapter (in `directory`) onto its base model frozen: weighted SFT would find
    nothing to train, in every worker, after the stages before it."""
    from drift_ray.engines import lora_adapter_base  # not at the top: it imports torch

    try:
        base = lora_adapter_base(str(directory))
    except ValueError:  # a record without its base: refused all the same
        base = None
    raise ValueError(
        f"{model}: a LoRA adapter (its {ADAPTER_RECORD}), which weighted SFT cannot train further; train its base "
        f"model{f' ({base})' if base else ''}, or save the model merged (train.lora.merge=true, the default) to "
        "train it further"
    )


def _model_within(path: Path) -> Path | None:
    """`path` where it is a model directory, else the model a run directory or training output `path` holds."""
    from drift_ray.train import MODEL_DIR  # not at the top: it imports torch

    candidates = (path, path / MODEL_DIR, path / TRAIN_DIR / MODEL_DIR)
    return next((candidate for candidate in candidates if candidate.is_dir() and not _not_a_model(candidate)), None)


def _models_named_like(model: str) -> str:
    """'; did you mean …?' naming the models in the directory of a missing `model` (for a Hub id, its namespace,
    or else the working directory) whose names are close to its own: runs/model for runs/modle, the model in
    runs/demo for runs/dmeo. Empty where none is: a Hub id's namespace is rarely a directory here."""
    parent, name = os.path.split(model.rstrip("/"))
    try:
        names = [entry.name for entry in Path(parent or ".").iterdir() if entry.is_dir()]
    except OSError:
        return ""
    found = [str(inner) for close in difflib.get_close_matches(name, names) if (inner := _model_within(Path(parent, close)))]
    return f"; did you mean {' or '.join(found)}?" if found else ""


def _require_hub_model(model: str, cfg: Config, *, to_train: bool = False) -> None:
    """Fail unless the Hugging Face Hub, or its local cache, holds the model (or LoRA adapter) `model`:
    here, in a line, rather than in every rollout actor or training worker, in pages of tracebacks. On a
    cluster the command joins, a Hub out of this machine's reach is only warned about: the workers may
    reach it, or hold the model in their caches."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    remedy = "give a local model directory, or a model id the Hub (or its local cache) holds"
    out_of_reach = False
    for record in ("config.json", ADAPTER_RECORD):  # a full model's, else an adapter's
        try:
            # Once the Hub is out of reach, the cache alone: each file asked of the network retries for ~20 s.
            downloaded = hf_hub_download(model, record, local_files_only=out_of_reach)
        except LocalEntryNotFoundError:  # before EntryNotFoundError, its base: not in the cache, Hub out of reach
            out_of_reach = True
        except EntryNotFoundError:
            continue
        except GatedRepoError:  # before RepositoryNotFoundError, its base
            raise ValueError(
                f"{model}: a gated model; it needs HF_TOKEN to hold the token of an account that its Hub page "
                f"(https://huggingface.co/{model}) granted access, or {remedy}"
            ) from None
        except RepositoryNotFoundError:
            raise ValueError(
                f"{model}: no such local directory, nor a model the Hugging Face Hub serves to this machine "
                f"(a private one needs a token in HF_TOKEN); {remedy}{_models_named_like(model)}"
            ) from None
        except (OSError, ValueError) as err:  # HTTP errors, and ids the Hub's validation refuses
            raise ValueError(
                f"{model}: no such local directory, and the Hugging Face Hub did not give it: {err}{_models_named_like(model)}"
            ) from None
        else:
            if to_train and record == ADAPTER_RECORD:
                _refuse_to_train_an_adapter(model, Path(downloaded).parent)
            return
    if out_of_reach:
        message = (
            f"{model}: no such local directory, and the Hugging Face Hub is out of reach (or HF_HUB_OFFLINE is set) "
            "with no copy of it in the local cache"
        )
        if cluster_address(cfg):
            log.warning("%s; left to the cluster's workers, which may reach the Hub or hold it in their caches", message)
            return
        raise ValueError(
            f"{message}; give a local model directory, or download the model into the cache where the Hub is "
            f"reachable (HF_HUB_OFFLINE=1 then uses it without trying the network){_models_named_like(model)}"
        )
    raise ValueError(f"{model}: the Hugging Face Hub holds it, but with neither config.json nor adapter_config.json; {remedy}")


# A model's config names its architecture; an adapter's config, its PEFT method.
ADAPTER_RECORD = "adapter_config.json"
_MODEL_RECORDS = {"config.json": ("model_type", "architectures"), ADAPTER_RECORD: ("peft_type",)}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _not_a_model(path: Path) -> str | None:
    """Why transformers or vLLM could not load a model or LoRA adapter from `path`; None where they could
    (as far as its files tell). Else a run directory, whose config.json is drift-ray's, or a model saved
    without its weights, fails in every actor or worker, in pages of tracebacks."""
    if not path.is_dir():
        return "a file"
    records = [name for name in _MODEL_RECORDS if (path / name).is_file()]
    if not records:
        return "no config.json, nor a LoRA adapter's adapter_config.json"
    problems = []
    for name in records:
        try:
            record = json.loads((path / name).read_bytes())
        except (OSError, ValueError) as err:
            problems.append(f"its {name} cannot be read as JSON: {err}")
            continue
        if not (isinstance(record, dict) and any(key in record for key in _MODEL_RECORDS[name])):
            keys = " or ".join(_MODEL_RECORDS[name])
            problems.append(f"its {name} names no {keys}" + (", as a drift-ray run's does" if (path / RUN_RECORD_FILE).is_file() else ""))
    if len(problems) == len(records):  # one record that holds a model or adapter is enough
        return problems[0]
    if not any(file.name.endswith(_WEIGHT_SUFFIXES) for file in path.iterdir()):
        return "no weights: no " + ", ".join(f"*{suffix}" for suffix in _WEIGHT_SUFFIXES) + " file"
    return None


@functools.lru_cache(maxsize=16)  # a command checks a model more than once: before the task, and as it resolves it
def _tokenizer_problem(model: str, modified_ns: int) -> str | None:
    """Why the tokenizer of the model directory `model` (last modified at `modified_ns`, so that a directory
    rewritten since is checked again) cannot format conversations, as every engine and the training workers
    would find after Ray and the model have started; None where it can. transformers builds an empty
    tokenizer from a directory without tokenizer files, which encodes every prompt as no tokens."""
    from transformers import AutoTokenizer

    try:
        # Not trust_remote_code, as neither the engines nor the training workers load one so.
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    except Exception as err:  # what tokenizer libraries raise varies: a missing package, a file they cannot read
        return f"its tokenizer does not load ({type(err).__name__}: {' '.join(str(err).split())[:300]})"
    if not tokenizer("hello", add_special_tokens=False)["input_ids"]:
        return (
            "its tokenizer encodes text as no tokens: the directory holds no tokenizer files (tokenizer.json, "
            "tokenizer.model, vocab.json, …)"
        )
    if not tokenizer.chat_template:
        return (
            "its tokenizer has no chat template, which the conversations are written with: save a chat model's "
            "tokenizer with the model (tokenizer.save_pretrained), or set tokenizer.chat_template"
        )
    return None


def rollouts_dir(cfg: Config) -> Path:
    return Path(cfg.rollout.output_dir) if cfg.rollout.output_dir else Path(cfg.run_dir) / "rollouts"


def require_training_problems(task: Task, kind: str) -> None:
    if not task.train:
        raise ValueError(_missing_split(task, "train", "task", kind))


def _missing_split(task: Task, split: str, key: str, kind: str) -> str:
    """Why `task` (of config section `key`, of task.kind `kind`) is refused without problems in `split` ("train"
    or "test"), with the remedy for its kind."""
    if kind in ("file", "hub"):
        other = "test" if split == "train" else "train"
        remedy = (
            f"give it a {split} split: {key}.{split}_path (a file task's, or a hub task's given {key}.{other}_path, "
            "which then reads no split from the Hub)"
        )
    else:
        remedy = f"its {'plugin' if kind == 'plugin' else 'builder'} ({key}.name) made none; give {key}.options that make some"
    return f"task {task.name!r} has no {'training problems' if split == 'train' else 'test problems to evaluate on'}; {remedy}"


def training_task(cfg: Config, evaluated: bool) -> Task:
    """`task`, for its training split; its test split too where `evaluated` (a run that evaluates on it, eval.task
    unset): else a test file would be read, and that split warned of and checked, for nothing."""
    return load_task(cfg.task, cfg.seed) if evaluated else _load_split(cfg.task, "train", cfg.seed)


def _rollouts_play(cfg: Config, task: Task) -> dict[str, Any]:
    """The arguments of play_settings that the rollouts stage plays with."""
    return dict(
        verifier=task.verifier,
        verifier_options=task.verifier_options,
        params=rollout_sampling(cfg),
        samples_per_prompt=cfg.rollout.samples_per_prompt,
    )


def check_rollouts_before_the_model(cfg: Config, task: Task) -> None:
    """Refuse rollouts of other settings than those in rollouts_dir before the reference is resolved: building
    builtin:demo, or downloading a Hub model, takes minutes that the refusal would waste, and a refusal then
    would name the other seed's demo reference by its cache path before the seed. The policy's own settings
    are checked once it is here (run_episodes)."""
    check_manifest(
        rollouts_dir(cfg),
        play_settings(cfg, **_rollouts_play(cfg, task)),
        ignore=MODEL_SETTINGS,
        meanings={
            f"sampling.{name}": f"{key} in the config"
            for name, key in (("temperature", "rollout.temperature"), ("top_p", "rollout.top_p"),
                              ("max_new_tokens", "rollout.max_new_tokens"), ("seed", "seed"))
        },
    )


def run_rollouts(
    cfg: Config, task: Task, model: str, start_ray: Callable[[], None], other_settings_remedy: str = RERUN_REMEDY
) -> dict[str, Any]:
    require_training_problems(task, cfg.task.kind)
    out = rollouts_dir(cfg)
    summary = run_episodes(
        task.train,
        out,
        model=model,
        cfg=cfg,
        **_rollouts_play(cfg, task),
        prompts_per_batch=cfg.rollout.prompts_per_batch,
        num_actors=cfg.rollout.num_actors,
        start_ray=start_ray,
        other_settings_remedy=other_settings_remedy,
    )
    log.info("rollouts: %s", summary)
    return summary


def weights_finished(run_dir: Path) -> bool:
    """Whether the weights stage in `run_dir` finished: its records, published with the weighted rollouts,
    mark them complete. Weights of a drift-ray that kept its records beside them are weighed again (the same
    weights: the model trained on them is reused)."""
    out = run_dir / WEIGHTED_DIR
    return (out / WEIGHTS_DIAGNOSTICS_FILE).is_file() and (out / WEIGHTS_SETTINGS_FILE).is_file()


def keep_rollouts_remedy(cfg: Config) -> str:
    """What to do where a stage after the rollouts was made with other settings: a new run_dir of its own
    would play the rollouts again, the stage that takes longest."""
    return (
        f"Rerun with the same config, or use a new run_dir with rollout.output_dir={rollouts_dir(cfg)} to weigh and "
        "train on these rollouts instead of playing them again (the rollouts of problems they lack are added there)."
    )


def check_later_rounds_before_the_models(cfg: Config) -> None:
    """Refuse, before any stage, a round whose model is to be trained anew (its training unfinished: killed, or
    its directory removed) where run_dir holds later rounds that this run plays, which were played from the
    model it replaces: each of their stages would be refused in turn, a rerun each."""
    from drift_ray.train import finished_model

    for round_index in range(1, cfg.rounds):
        later = [r for r in rounds_beyond(cfg.run_dir, round_index) if r <= cfg.rounds]
        model_dir = Path(round_config(cfg, round_index).run_dir) / TRAIN_DIR
        if later and not finished_model(model_dir):
            raise RuntimeError(
                f"{model_dir}: round {round_index}'s model is to be trained anew, and {cfg.run_dir} holds round(s) "
                f"{', '.join(map(str, later))} built on the model it replaces: {_remove_rounds_from(cfg, later[0])}, "
                "or use a new run_dir"
            )


def later_round_remedy(cfg: Config, round_index: int) -> str:
    """What to do where a stage of round `round_index` > 1 was made with other settings: it and the rounds
    after it build on the model of the round before."""
    return f"Rerun with the same config, or {_remove_rounds_from(cfg, round_index)}, or use a new run_dir."


def _remove_rounds_from(cfg: Config, round_index: int) -> str:
    last = max([cfg.rounds, *rounds_beyond(cfg.run_dir, cfg.rounds)])
    rounds = [Path(round_config(cfg, r).run_dir) for r in range(round_index, last + 1)]
    present = [str(path) for path in rounds if path.exists()] or [str(rounds[0])]
    return (
        f"remove {', '.join(present)} to play round {round_index} and the rounds after it again (each builds on the "
        "model of the round before)"
    )


_WEIGHTS_MEANINGS = {"prompts": "the training problems, which the task.* keys and seed choose"}


def _weighing(cfg: Config, prompt_ids: Sequence[str]) -> dict[str, Any]:
    """What the weights' records hold besides the rollouts: the weights settings and the training problems (their
    sorted `prompt_ids`)."""
    return {
        "weights": cfg.weights.model_dump(mode="json"),
        "prompts": {"count": len(prompt_ids), "sha256": hashlib.sha256("\n".join(prompt_ids).encode()).hexdigest()},
    }


def check_weights_before_the_rollouts(cfg: Config, task: Task) -> None:
    """Refuse finished weights in run_dir of other weights settings or training problems before the rollouts
    play (and the reference is resolved): a task with more problems would have its new ones played for nothing."""
    out = Path(cfg.run_dir) / WEIGHTED_DIR
    if weights_finished(Path(cfg.run_dir)):
        settings = _weighing(cfg, sorted(p.prompt_id for p in task.train))
        require_same_settings(
            out / WEIGHTS_SETTINGS_FILE,
            settings,
            output=str(out),
            only=list(settings),
            meanings=_WEIGHTS_MEANINGS,
            remedy=keep_rollouts_remedy(cfg),
        )


def run_weights(
    cfg: Config, task: Task, start_ray: Callable[[], None], other_settings_remedy: str = RERUN_REMEDY
) -> dict[str, Any]:
    """Returns and normalised weights of the rollouts of the task's training prompts, as a Ray Data map
    stage; skipped when done (refused when other settings made it, with `other_settings_remedy`)."""
    import ray.data
    from ray.data.expressions import col

    from drift_ray.weights import add_weights, weight_diagnostics, weight_warnings

    require_training_problems(task, cfg.task.kind)
    run_dir = Path(cfg.run_dir)
    out = run_dir / WEIGHTED_DIR
    rollouts = rollouts_dir(cfg)
    prompt_ids = sorted(p.prompt_id for p in task.train)
    # The rollouts by their settings and prompts, not by path: a run_dir that moved is still the same run,
    # and other runs may add prompts of their own to a shared rollout.output_dir.
    settings = {
        **_weighing(cfg, prompt_ids),
        "rollouts": read_json_object(
            manifest_file(rollouts),
            f"it records what played the rollouts in {rollouts}: restore it, or remove {rollouts} (with every run's "
            "rollouts there, where rollout.output_dir is shared) to play them again",
        ),
        "rollouts_fingerprint": rollouts_fingerprint(rollouts, prompt_ids),
    }
    if weights_finished(run_dir):
        require_same_settings(
            out / WEIGHTS_SETTINGS_FILE,
            settings,
            output=str(out),
            inputs=["rollouts_fingerprint"],
            meanings=_WEIGHTS_MEANINGS,
            remedy=other_settings_remedy,
        )
        diagnostics = read_json_object(out / WEIGHTS_DIAGNOSTICS_FILE, f"remove {out} to weigh the rollouts again")
        log.info("weights: %s holds them, weighed with these settings before; their diagnostics: %s", out, diagnostics)
        return diagnostics
    start_ray()
    shards = [str(shard) for shard in sorted(rollouts.glob(SHARD_GLOB))]
    # With the schema, shards played before a column was recorded (CUT_OFF) read with it as null; else Ray
    # Data would write some weighted files without it.
    trajectories = ray.data.read_parquet(shards, schema=TRAJECTORY_SCHEMA).filter(expr=col(PROMPT_ID).is_in(prompt_ids))
    group_size = settings["rollouts"]["samples_per_prompt"]
    ds = add_weights(trajectories, cfg.weights, whole_groups=False, group_size=group_size)
    staging = run_dir / "weighted.staging"
    # A run killed while weighing, or weights without their records (an earlier drift-ray's): redo them.
    for leftover in (staging, out):
        shutil.rmtree(leftover, ignore_errors=True)
    ds.write_parquet(str(staging))
    diagnostics = weight_diagnostics(pq.read_table(staging))  # before the records join the Parquet files
    write_json_atomic(settings, staging / WEIGHTS_SETTINGS_FILE)
    write_json_atomic(diagnostics, staging / WEIGHTS_DIAGNOSTICS_FILE)
    publish_directory(staging, out)
    log.info("weights: %s", diagnostics)
    for warning in weight_warnings(diagnostics):
        log.warning("weights: %s", warning)
    if diagnostics["cut_off_reply_share"]:
        log.warning(
            "weights: %.1f%% of the rollouts' replies (of those recorded) reached rollout.max_new_tokens=%d, or the "
            "engine's context limit, before they ended (as trained replies, without an end of turn, they carry "
            "%.1f%% of the weight); raise rollout.max_new_tokens to let them finish",
            100 * diagnostics["cut_off_reply_share"],
            settings["rollouts"]["sampling"]["max_new_tokens"],
            100 * diagnostics["cut_off_last_reply_weight_share"],
        )
    return diagnostics


def run_training(
    cfg: Config,
    reference: str,
    start_ray: Callable[[], None],
    weighted: str | None = None,
    other_settings_remedy: str = RERUN_REMEDY,
) -> str:
    """Weighted SFT of the reference on weighted trajectories (default: the run's own, run_dir/weighted)
    into run_dir/train; returns the trained model's directory."""
    from drift_ray.train import MODEL_DIR, finished_model, train_weighted_sft

    out = Path(cfg.run_dir) / TRAIN_DIR
    weighted = weighted or str(Path(cfg.run_dir) / WEIGHTED_DIR)
    reused = finished_model(out)
    stats = train_weighted_sft(
        cfg, weighted, reference, str(out), start_ray=start_ray, other_settings_remedy=other_settings_remedy
    )
    if reused:  # its wall_seconds are those of the run that trained it
        log.info("training: %s holds the model, trained with these settings before; its statistics: %s", out / MODEL_DIR, stats)
    else:
        log.info("training: %s", stats)
    if stats.get("truncated_examples"):
        log.warning(
            "training: %d examples (counted once per epoch) were longer than train.max_length=%d tokens and lost "
            "their oldest turns after the question, then, where that was not enough, their earliest tokens (or, "
            "where the trained reply alone is longer, the reply's end, its end of turn too); raise "
            "train.max_length to train on them whole",
            stats["truncated_examples"],
            cfg.train.max_length,
        )
    return str(out / MODEL_DIR)


def evaluation_task(cfg: Config, train_task: Task | None = None) -> Task:
    """The task whose test split is evaluated: `eval.task` when set, else `task` (reusing `train_task`)."""
    if cfg.eval.task is not None:
        task = _load_split(cfg.eval.task, "test", cfg.seed, key="eval.task")
    else:
        task = train_task or _load_split(cfg.task, "test", cfg.seed)
    if not task.test:
        key, kind = ("task", cfg.task.kind) if cfg.eval.task is None else ("eval.task", cfg.eval.task.kind)
        raise ValueError(
            _missing_split(task, "test", key, kind)
            + (" or set eval.task to a task with one (e.g. eval.task.kind=hub eval.task.name=math500)" if key == "task" else "")
        )
    if train_task is not None and (shared := shared_questions(train_task.train, task.test)):
        # Files and hub copies are split by whoever made them: the same file for both splits is one slip.
        log.warning(
            "evaluation: %d of the %d test problems of task %r ask a question that the training problems of "
            "task %r ask too, so the trained model is scored on questions it was trained on; give test "
            "problems the training split lacks",
            shared, len(task.test), task.name, train_task.name,
        )
    return task


def _load_split(task: TaskConfig, split: str, seed: int, key: str = "task") -> Task:
    """`task` (of config section `key`) with the problems of `split` ("train" or "test") alone. Where it gives
    that split's file, the other one is not read: a path copied with the task (`drift-ray eval` on a run's
    config, eval.task as a YAML alias of task) would be read for nothing, or stop the command where that file
    is not here. Its name is the one it has with both files (a file task's, of its training file), so that
    `drift-ray eval` names the task as `run` does."""
    other = "test" if split == "train" else "train"
    given = getattr(task, f"{split}_path")
    task = task.model_copy(update={"name": task_label(task), **({f"{other}_path": None} if given else {})})
    return load_task(task, seed, key=key, splits=(split,))


def _eval_play(cfg: Config, task: Task) -> dict[str, Any]:
    """The arguments of play_settings that the evaluation plays with."""
    return dict(verifier=task.verifier, verifier_options=task.verifier_options, params=eval_sampling(cfg), samples_per_prompt=1)


def _other_evaluation_remedy(out: Path, label: str) -> str:
    return (
        f"Rerun with the same config, remove {out} to evaluate {label} again, or use a new run_dir; `drift-ray eval "
        "--model LABEL=MODEL` evaluates a model under a label of its own."
    )


def check_evaluations_before_the_models(cfg: Config, task: Task, labels: Sequence[str]) -> None:
    """Refuse to evaluate a model under any of `labels` with other settings than its evaluation in run_dir/eval
    was played with, before the models are resolved (or trained): building builtin:demo or downloading a Hub
    model takes minutes that the refusal would waste. The models themselves are checked once they are here
    (run_episodes)."""
    for label in labels:
        out = Path(cfg.run_dir) / "eval" / label
        check_manifest(
            out,
            play_settings(cfg, **_eval_play(cfg, task)),
            _other_evaluation_remedy(out, label),
            ignore=MODEL_SETTINGS,
            meanings={"sampling.max_new_tokens": "eval.max_new_tokens (default: rollout.max_new_tokens) in the config"},
        )


def run_eval(cfg: Config, task: Task, models: dict[str, str], start_ray: Callable[[], None]) -> dict[str, Any]:
    """Greedy multi-turn episodes of every model on the test split; metrics, table and plot under run_dir/eval."""
    from drift_ray.evaluation import episode_metrics, write_report

    eval_dir = Path(cfg.run_dir) / "eval"
    test_ids = [p.prompt_id for p in task.test]  # not the episodes of problems an earlier run's test split had
    metrics = {}
    for label, model in models.items():
        out = eval_dir / label
        played = run_episodes(
            task.test,
            out,
            model=model,
            cfg=cfg,
            **_eval_play(cfg, task),
            prompts_per_batch=cfg.eval.prompts_per_batch,
            num_actors=cfg.eval.num_actors,
            start_ray=start_ray,
            other_settings_remedy=_other_evaluation_remedy(out, label),
        )
        log.info("eval: %s: %s", label, played)  # as the rollouts': a rerun says what it took over
        metrics[label] = episode_metrics(read_shards(out, prompt_ids=test_ids), cfg.episode.max_turns)
        if metrics[label]["cut_off_rate"]:
            log.warning(
                "eval: %.1f%% of %s's replies (of those recorded) reached max_new_tokens=%d, or the engine's "
                "context limit, before they ended, which counts them as format failures; raise eval.max_new_tokens "
                "to let them finish",
                100 * metrics[label]["cut_off_rate"],
                label,
                eval_sampling(cfg).max_new_tokens,
            )
    options = f" {dict(task.verifier_options)}" if task.verifier_options else ""
    evaluated_on = (
        f"Task {task.name!r}: {len(task.test)} test problems, verifier {task.verifier!r}{options}; one greedy episode "
        f"of up to {cfg.episode.max_turns} turns per problem, replies of up to {eval_sampling(cfg).max_new_tokens} new "
        f"tokens{', reasoning asked for in <think>' if cfg.episode.think else ''}, feedback {cfg.episode.feedback!r}."
    )
    paths = write_report(metrics, cfg.episode.max_turns, eval_dir, evaluated_on)
    return {"metrics": metrics, "paths": paths}


ROUND_DIR_PREFIX = "round-"


def round_config(cfg: Config, round_index: int) -> Config:
    """The config of round `round_index` (1-based) of iterated DRIFT: round 1 is `cfg` itself; a later
    round has its own run_dir (run_dir/round-r) and rollouts, and a seed of its own."""
    if round_index == 1:
        return cfg
    later = cfg.model_copy(deep=True)
    later.run_dir = str(Path(cfg.run_dir) / f"{ROUND_DIR_PREFIX}{round_index}")
    later.rollout.output_dir = None
    later.seed = cfg.seed + round_index - 1
    return later


def round_suffix(round_index: int) -> str:
    """What names round `round_index`'s stages (timings_s) and model (its evaluation's label) after round 1's."""
    return "" if round_index == 1 else f"_round{round_index}"


def rounds_beyond(run_dir: str | Path, rounds: int) -> list[int]:
    """The rounds after the first `rounds` whose directories run_dir holds: an earlier run's, with more rounds."""
    found = (path.name.removeprefix(ROUND_DIR_PREFIX) for path in Path(run_dir).glob(f"{ROUND_DIR_PREFIX}*"))
    return sorted(int(r) for r in found if r.isdigit() and int(r) > rounds)


def run_pipeline(cfg: Config) -> dict[str, Any]:
    """All stages in order, holding run_dir's lock; returns per-stage wall-clock (with ray_start apart,
    absent when no stage had work left), what the stages of every round took over from earlier runs (as
    RUN_RECORD_FILE) and its weight diagnostics, the evaluated models' directories by label (the
    reference's included) and the evaluation report.

    With `rounds` R > 1 (iterated DRIFT), rounds 2..R collect rollouts from the policy the previous
    round trained and train it further; the evaluation compares the reference with every round's model.
    """
    if cfg.rollout.engine is EngineKind.openai:
        # The trained model exists only once the run has trained it: vLLM serve would refuse its name after
        # the training, and a server of one model would answer with that one under the trained model's label.
        raise ValueError(
            "rollout.engine=openai: drift-ray run evaluates the model it trains (and rounds > 1 play it), which "
            "the server at rollout.api_base does not serve. Run `drift-ray rollouts`, `weights` and `train`, "
            "serve the trained model, and evaluate it with `drift-ray eval`"
        )
    with lock_run_dir(cfg, "run", writes_rollouts=True):
        return _run_stages(cfg)


def _run_stages(cfg: Config) -> dict[str, Any]:
    from drift_ray.train import finished_model, read_stats

    timings: dict[str, float] = {}
    ray_start_s = 0.0

    def timed(name: str, fn, *args, **kwargs):
        start, ray_start_before = time.perf_counter(), ray_start_s
        result = fn(*args, **kwargs)
        # The stage that starts Ray is timed without that: ray_start is a row of its own.
        timings[name] = round(time.perf_counter() - start - (ray_start_s - ray_start_before), 2)
        return result

    def ray_starter(first_stage: str, round_index: int = cfg.rounds) -> Callable[[], None]:
        """The start_ray of a stage of round `round_index` whose work needs `first_stage` on Ray."""
        stages = stages_left(first_stage, round_index, cfg.rounds)

        def start_ray() -> None:
            nonlocal ray_start_s
            if "ray_start" not in timings:
                start = time.perf_counter()
                connect_ray(cfg, stages)
                ray_start_s = time.perf_counter() - start
                timings["ray_start"] = round(ray_start_s, 2)

        return start_ray

    check_model_here(cfg.rollout.model, cfg, to_train=True)  # before the task, which may be a download
    task = timed("prompts", training_task, cfg, cfg.eval.task is None)
    check_rollouts_before_the_model(cfg, task)
    check_weights_before_the_rollouts(cfg, task)
    check_later_rounds_before_the_models(cfg)
    # Before any stage: a mistake in eval.task, or evaluations of other settings, must not surface only after
    # the training.
    eval_task = timed("eval_prompts", evaluation_task, cfg, task)
    labels = {r: f"{cfg.weights.mode.value}{round_suffix(r)}" for r in range(1, cfg.rounds + 1)}  # of the trained models
    check_evaluations_before_the_models(cfg, eval_task, ["reference", *labels.values()])
    reference = timed("reference_model", resolve_model, cfg.rollout.model, cfg, to_train=True)
    if beyond := rounds_beyond(cfg.run_dir, cfg.rounds):
        # Else the rewritten run.json and evaluation report would drop them without a word.
        log.warning(
            "%s holds round(s) %s of an earlier run with more rounds, which this one (rounds=%d) neither continues "
            "nor evaluates: its run.json and evaluation report leave them out; rerun with rounds=%d to keep them",
            cfg.run_dir, ", ".join(map(str, beyond)), cfg.rounds, beyond[-1],
        )
    models = {"reference": reference}
    policy = reference
    work_by_round, diagnostics_by_round = [], []
    for round_index in range(1, cfg.rounds + 1):
        if cfg.rounds > 1:  # the stages' own lines are the same in every round
            log.info("iterated DRIFT: round %d of %d, rollouts from %s", round_index, cfg.rounds, policy)
        round_cfg = round_config(cfg, round_index)
        round_dir = Path(round_cfg.run_dir)
        suffix = round_suffix(round_index)
        # Round 1's weights and training take part in its rollouts, which a new run_dir can share; a later
        # round's stages are its own, all built on the model of the round before.
        if round_index == 1:
            rollouts_remedy, remedy = RERUN_REMEDY, keep_rollouts_remedy(cfg)
        else:
            rollouts_remedy = remedy = later_round_remedy(cfg, round_index)
        rollouts = timed(
            f"rollouts{suffix}", run_rollouts, round_cfg, task, policy, ray_starter("rollouts", round_index),
            other_settings_remedy=rollouts_remedy,
        )
        work = {"rollouts": rollouts, "weights_reused": weights_finished(round_dir)}
        # The weights stage asks Ray Data for no more than a CPU. New weights are new training input, so
        # the training after it is checked too (even in the rare rerun whose weights come out the same).
        start_before_training = ray_starter("train", round_index)
        diagnostics = timed(f"weights{suffix}", run_weights, round_cfg, task, start_before_training, other_settings_remedy=remedy)
        diagnostics_by_round.append(diagnostics)
        work["model_reused"] = finished_model(round_dir / TRAIN_DIR)
        policy = timed(
            f"weighted_sft{suffix}", run_training, round_cfg, policy, start_before_training, other_settings_remedy=remedy
        )
        work["resumed_from_step"] = read_stats(policy)["resumed_from_step"]
        work_by_round.append(work)
        models[labels[round_index]] = policy
    report = timed("evaluation", run_eval, cfg, eval_task, models, ray_starter("eval"))
    # At the end: a run refused or killed part-way leaves the last finished run's record (config.json, a
    # copy of its config written after it, may be newer).
    config = cfg.model_dump(mode="json")
    record = {
        "config": config,
        "timings_s": timings,
        "work_by_round": work_by_round,
        "models": models,
        "metrics": report["metrics"],
    }
    write_json_atomic(record, Path(cfg.run_dir) / RUN_RECORD_FILE)
    write_json_atomic(config, Path(cfg.run_dir) / CONFIG_FILE)
    return {
        "timings_s": timings,
        "work_by_round": work_by_round,
        "weights_by_round": diagnostics_by_round,
        "models": models,
        **report,
    }
