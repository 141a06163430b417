"""Rollout throughput: the Ray Data rollout stage with 1 and 2 actors against the same engine in-process.

Workload: the first --prompts training problems of the config's task, K episodes each, with the config's
episode (turns, feedback) and sampling (temperature, top_p, max_new_tokens, seed), in batches of
prompts_per_batch problems: one actor call's worth. Every path plays exactly these batches with the same
seeds, so all generate the same trajectories (up to float rounding between thread counts).

- in-process: TransformersEngine + play_episodes in this process, batch after batch, with 1 and with 2
  torch threads; and, at 1 thread, with share_prefill=False and with carry_cache=False, to show what
  each engine option is worth.
- 2 processes x 1 thread: two engines, every other batch each, started together once both have loaded.
  This is the practical limit on 2 cores. A model this small gains little from a second thread inside
  one operation (too little work per matmul to split), and when anything else runs on the machine
  the two threads wait on each other at every operation; two independent engines never wait, and no
  pipeline of the same engine can beat them.
- Ray Data: `rollouts.run_episodes` on a local Ray cluster of 2 CPUs with 1 actor and with 2 actors,
  1 CPU and 1 torch thread each, so 2 actors / 1 actor is the scaling alone, and 1 actor / in-process
  at 1 thread is the pipeline's overhead alone.
Start-up is kept apart from steady state. In-process it is the model load. For Ray, ray.init is timed
once; each run_episodes call starts its own actors, and its start-up is the time from the call to the
first batch starting on an actor (Ray's task timeline; averaged over the actors): worker processes,
model loads, Ray Data planning. Steady state is the rest of the call, shard writes and result
collection included. actors_busy: the share of the steady state the actors spent inside batches,
which tells a pipeline that leaves actors waiting from a machine too busy to run them.
Targets: Ray Data with 1 actor >= 50% of in-process; 2 actors >= 1.7x 1 actor.

Model: the config's reference (builtin:demo is built once and cached, as the pipeline does), or --model
PATH. --quick uses a randomly initialised model of the demo architecture, which writes max_new_tokens
every turn: fine for throughput.

    .venv/bin/python benchmarks/rollouts.py [--config jobs/demo_cpu.yaml] [--prompts 256] [--model PATH] [--quick] [--out DIR]
"""

from __future__ import annotations

import multiprocessing
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence


sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import add_size_option, append_result, argument_parser, local_ray, print_table, run_benchmark, weight_checksums  # noqa: E402

from drift_ray.config import Config, EngineKind, EpisodeConfig, load_config  # noqa: E402
from drift_ray.demo_model import save_untrained_demo_model  # noqa: E402
from drift_ray.engines import TransformersEngine  # noqa: E402
from drift_ray.episode import SamplingParams, play_episodes  # noqa: E402
from drift_ray.pipeline import resolve_model  # noqa: E402
from drift_ray.prompts import Problem, Task, load_task  # noqa: E402
from drift_ray.rollouts import rollout_sampling, run_episodes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET_ONE_ACTOR_VS_IN_PROCESS = 0.5
TARGET_TWO_ACTORS_VS_ONE = 1.7
QUICK = {"prompts": 4, "prompts_per_batch": 2, "samples_per_prompt": 4, "max_new_tokens": 8, "max_turns": 2}


def play_batches(
    engine: TransformersEngine,
    batches: Sequence[Sequence[Problem]],
    task: Task,
    params: SamplingParams,
    samples_per_prompt: int,
    episode: EpisodeConfig,
) -> dict[str, float]:
    """Play every batch as one actor call would, with a verifier of its own (as an actor builds; no answers
    cached by an earlier measurement); the generated tokens, trajectories and seconds."""
    verifier = task.new_verifier()
    started = time.perf_counter()
    episodes = [
        e for batch in batches for e in play_episodes(batch, engine, verifier, params, samples_per_prompt, episode)
    ]
    return {
        "seconds": time.perf_counter() - started,
        "trajectories": len(episodes),
        "completion_tokens": sum(e.completion_tokens for e in episodes),
    }


def measure_in_process(model: str, threads: int, workload: dict[str, Any], **options: bool) -> dict[str, Any]:
    started = time.perf_counter()
    engine = TransformersEngine(model, device="cpu", torch_threads=threads, **options)
    startup = time.perf_counter() - started
    return {"startup_s": startup, **play_batches(engine, **workload)}


_start_together = None  # a spawned worker's barrier, shared with the other worker by the pool's initializer


def _share_barrier(barrier) -> None:
    global _start_together
    _start_together = barrier


def _engine_process(model: str, workload: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        engine = TransformersEngine(model, device="cpu", torch_threads=1)
    except BaseException:
        _start_together.abort()  # else the other worker waits at the barrier for ever
        raise
    startup = time.perf_counter() - started
    _start_together.wait()
    return {"startup_s": startup, **play_batches(engine, **workload)}


def measure_two_processes(model: str, workload: dict[str, Any]) -> dict[str, Any]:
    """Two 1-thread engines in their own processes, each playing every other batch, timed from a common start.
    An engine that fails to load aborts the start, so the other does not wait for it, and the measurement ends
    with the failure's own error; a worker that dies ends the pool, and the measurement (BrokenProcessPool)."""
    context = multiprocessing.get_context("spawn")
    halves = [{**workload, "batches": workload["batches"][i::2]} for i in range(2)]
    with ProcessPoolExecutor(2, mp_context=context, initializer=_share_barrier, initargs=(context.Barrier(2),)) as pool:
        futures = [pool.submit(_engine_process, model, half) for half in halves]
        errors = [error for error in (future.exception() for future in futures) if error is not None]
    if errors:  # the cause, not the other engine's aborted wait for it
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    parts = [future.result() for future in futures]
    return {
        "startup_s": max(p["startup_s"] for p in parts),
        "seconds": max(p["seconds"] for p in parts),
        "trajectories": sum(p["trajectories"] for p in parts),
        "completion_tokens": sum(p["completion_tokens"] for p in parts),
    }


def measure_ray(
    cfg: Config, model: str, task: Task, problems: list[Problem], num_actors: int, work_dir: Path
) -> dict[str, Any]:
    """run_episodes with `num_actors` actors of 1 CPU, no GPU and 1 thread, as the in-process rows run; start-up
    ends when the actors start working. The config's custom resources (a cluster node type's, e.g.
    rollout_gpu) are dropped: the local cluster has none, and the actors would wait for them for ever."""
    rollout = cfg.rollout.model_copy(
        update={"num_actors": num_actors, "cpus_per_actor": 1, "gpus_per_actor": 0, "torch_threads": 1, "resources": {}}
    )
    called = time.time()
    summary = run_episodes(
        problems,
        work_dir / f"ray-{num_actors}-actors",
        model=model,
        cfg=cfg.model_copy(update={"rollout": rollout}),
        verifier=task.verifier,
        verifier_options=task.verifier_options,
        params=rollout_sampling(cfg),
        samples_per_prompt=rollout.samples_per_prompt,
        prompts_per_batch=rollout.prompts_per_batch,
        num_actors=num_actors,
    )
    returned = time.time()
    batches = batch_spans(called, -(-len(problems) // rollout.prompts_per_batch))
    # Each actor starts once its own model is loaded: average their first batch starts.
    working = sum(min(start for start, _ in spans) for spans in batches.values()) / len(batches)
    busy = sum(end - start for spans in batches.values() for start, end in spans)
    return {
        "startup_s": working - called,
        "seconds": returned - working,
        "trajectories": summary["trajectories"],
        "completion_tokens": summary["completion_tokens"],
        "actors_busy": busy / (num_actors * (returned - working)),
    }


def batch_spans(since: float, batches: int, wait_s: float = 30.0) -> dict[str, list[tuple[float, float]]]:
    """(start, end) in epoch seconds of every EpisodeStage batch since `since`, per actor, from Ray's task
    timeline: Ray Data runs each batch as a `submit` task of a MapWorker actor. Task events reach the
    timeline a second or so late, so this waits until all `batches` are there."""
    import ray

    deadline = time.time() + wait_s
    while True:
        spans: dict[str, list[tuple[float, float]]] = {}
        for event in ray.timeline():
            if (
                event.get("ph") == "X"
                and event.get("name") == "submit"
                and "EpisodeStage" in event.get("cat", "")
                and event["ts"] / 1e6 >= since
            ):
                start = event["ts"] / 1e6
                spans.setdefault(event["tid"], []).append((start, start + event["dur"] / 1e6))
        found = sum(map(len, spans.values()))
        if found >= batches:
            return spans
        if time.time() > deadline:
            raise RuntimeError(
                f"Ray's task timeline shows {found} EpisodeStage batches (MapWorker 'submit' events) since the "
                f"call, expected {batches}; this Ray version may name them differently"
            )
        time.sleep(0.5)


def row(path: str, threads: str, figures: dict[str, Any]) -> dict[str, Any]:
    return {
        "path": path,
        "threads": threads,
        **figures,
        "tokens_per_s": figures["completion_tokens"] / figures["seconds"],
        "trajectories_per_s": figures["trajectories"] / figures["seconds"],
    }


def main() -> None:
    parser = argument_parser(__doc__, "rollouts")
    parser.add_argument(
        "--config", type=Path, default=ROOT / "jobs" / "demo_cpu.yaml", help="job config to take the workload from"
    )
    add_size_option(parser, "--prompts", full=256, quick=QUICK["prompts"], help="training problems to play (K episodes each)")
    parser.add_argument("--model", help="model directory (default: the config's rollout.model)")
    args = parser.parse_args()
    if args.model and not Path(args.model).is_dir():
        parser.error(f"argument --model: {args.model} is not a directory")

    cfg = load_config(args.config)
    if cfg.rollout.engine is not EngineKind.transformers:
        # Its rows compare the pipeline with the same engine in-process, on CPUs: another engine would make
        # every ratio one of two engines.
        parser.error(
            f"{args.config}: rollout.engine={cfg.rollout.engine.value}; this benchmark times the transformers engine "
            "on CPUs, in-process and in Ray Data actors. Time a GPU or served job with benchmarks/end_to_end.py."
        )
    if args.quick:
        quick_rollout = {k: QUICK[k] for k in ("prompts_per_batch", "samples_per_prompt", "max_new_tokens")}
        cfg = cfg.model_copy(
            update={
                "rollout": cfg.rollout.model_copy(update=quick_rollout),
                "episode": cfg.episode.model_copy(update={"max_turns": QUICK["max_turns"]}),
            }
        )
    task = load_task(cfg.task, cfg.seed)
    problems = task.train[: args.prompts]
    r = cfg.rollout
    batches = [problems[i : i + r.prompts_per_batch] for i in range(0, len(problems), r.prompts_per_batch)]
    workload = {
        "batches": batches,
        "task": task,
        "params": rollout_sampling(cfg),
        "samples_per_prompt": r.samples_per_prompt,
        "episode": cfg.episode,
    }

    with tempfile.TemporaryDirectory(prefix="drift-rollout-bench-") as tmp:
        work_dir = Path(tmp)
        started = time.perf_counter()
        if args.model:
            model = args.model
        elif args.quick:
            model = save_untrained_demo_model(work_dir / "random-demo-model", seed=cfg.seed)
        else:
            model = resolve_model(r.model, cfg)
        model_s = time.perf_counter() - started
        reference_sha256 = weight_checksums(model)  # the cache key alone does not tell two builds apart

        results = [
            row("in-process", "1", measure_in_process(model, 1, workload)),
            row("in-process", "2", measure_in_process(model, 2, workload)),
            row("in-process, share_prefill=False", "1", measure_in_process(model, 1, workload, share_prefill=False)),
            row("in-process, carry_cache=False", "1", measure_in_process(model, 1, workload, carry_cache=False)),
            row("2 processes (practical limit)", "1 each", measure_two_processes(model, workload)),
        ]
        with local_ray(num_cpus=2) as ray_init_s:
            for actors in (1, 2):
                figures = measure_ray(cfg, model, task, problems, actors, work_dir)
                label = "Ray Data, 1 actor" if actors == 1 else f"Ray Data, {actors} actors"
                results.append(row(label, "1" if actors == 1 else "1 each", figures))

    in_process, two_threads, unshared, uncarried, limit, one_actor, two_actors = results
    for result in results:
        result["vs_in_process"] = result["tokens_per_s"] / in_process["tokens_per_s"]
    checks = [
        ("Ray Data 1 actor / in-process (1 thread)", one_actor, in_process, TARGET_ONE_ACTOR_VS_IN_PROCESS),
        ("Ray Data 2 actors / 1 actor", two_actors, one_actor, TARGET_TWO_ACTORS_VS_ONE),
        ("Ray Data 2 actors / 2 processes (practical limit)", two_actors, limit, None),
        ("in-process 2 threads / 1 thread", two_threads, in_process, None),
        ("2 processes / in-process 1 thread", limit, in_process, None),
        ("share_prefill: on / off", in_process, unshared, None),
        ("carry_cache: on / off", in_process, uncarried, None),
    ]
    targets = []
    for name, measured, reference, target in checks:
        ratio = measured["tokens_per_s"] / reference["tokens_per_s"]
        targets.append({"check": name, "ratio": ratio, "target": f">= {target}" if target else None,
                        "met": ratio >= target if target else None})
    config = {
        "config": str(args.config),
        "model": "random demo architecture" if args.quick and not args.model else model,
        "reference_sha256": reference_sha256,
        "resolved_config": cfg.model_dump(mode="json"),
        "prompts": len(problems),
        "prompts_per_batch": r.prompts_per_batch,
        "samples_per_prompt": r.samples_per_prompt,
        "max_new_tokens": r.max_new_tokens,
        "max_turns": cfg.episode.max_turns,
        "temperature": r.temperature,
        "quick": args.quick,
        "model_build_or_load_s": model_s,
        "ray_init_s": ray_init_s,
    }
    print(
        f"\nrollouts: {len(problems)} problems x K={r.samples_per_prompt}, up to {cfg.episode.max_turns} turns of "
        f"{r.max_new_tokens} new tokens, batches of {r.prompts_per_batch}; model ready in {model_s:.1f} s, "
        f"ray.init {ray_init_s:.1f} s\n"
    )
    columns = ["path", "threads", "startup_s", "seconds", "trajectories", "completion_tokens", "tokens_per_s",
               "trajectories_per_s", "vs_in_process", "actors_busy"]
    print_table(results, columns)
    print()
    print_table(targets, ["check", "ratio", "target", "met"])
    print(f"\nappended to {append_result('rollouts', config, results + targets, args.out)}")


if __name__ == "__main__":
    run_benchmark(main)
