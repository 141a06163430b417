"""Smoke tests of the benchmark scripts: every `benchmarks/*.py` but record.py runs with `--quick --out DIR`
as its own process, prints a table and appends one JSON line with the agreed keys to `DIR/<benchmark>.jsonl`.

Figures are not checked: on a shared test machine they mean nothing. Every script starts Ray in its full
--quick run (one to three minutes each on 2 cores, more than a pipeline run for the three that run one), so
those runs are marked slow and extended: the default run leaves them out, `pytest -m extended` runs them.
A script with a Ray-free mode also runs in it unmarked, in the default run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from drift_ray import schema
from drift_ray.config import WeightsConfig
from drift_ray.demo_model import save_untrained_demo_model
from drift_ray.weights import compute_weights

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(path.name for path in BENCHMARKS.glob("*.py") if path.name != "record.py")
RAY_FREE_ARGS = {"weights.py": ["--no-ray"]}
# Their lines checksum the reference's weights and hold the config they ran, resolved: a config file's path
# alone may name a file the commit does not have.
SCRIPTS_WITH_A_REFERENCE = {"end_to_end.py", "online_rl.py", "quality.py", "rollouts.py"}
SCRIPTS_WITH_A_TMP_DIR = {"end_to_end.py", "online_rl.py"}  # their run_dir must be shared storage on several nodes
RECORD_KEYS = {"benchmark", "time", "commit", "machine", "config", "results"}
TIMEOUT_S = 900  # a hung script fails the test instead of blocking the suite


def run_quick(script: str, out: Path, extra: list[str]) -> dict:
    """Run the script; return the one JSON record it appended under `out`."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out), *extra],
        cwd=BENCHMARKS.parent,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"{script} exited with {done.returncode}:\n{output}"
    assert any(line.startswith("| ") for line in done.stdout.splitlines()), f"{script} printed no table:\n{done.stdout}"
    files = list(out.iterdir())
    assert len(files) == 1 and files[0].suffix == ".jsonl", f"{script} wrote {[f.name for f in files]}"
    lines = files[0].read_text().splitlines()
    assert len(lines) == 1, f"{script} appended {len(lines)} lines; expected one per run"
    assert str(BENCHMARKS.parent) not in lines[0] and str(out) not in lines[0], "the line names a machine path"
    record = json.loads(lines[0])
    assert set(record) == RECORD_KEYS
    assert files[0].name == f"{record['benchmark']}.jsonl"
    assert isinstance(record["config"], dict) and record["config"]
    assert record["results"] and all(isinstance(row, dict) and row for row in record["results"])
    assert record["machine"]["cpus"] >= 1
    assert record["machine"]["cpu"] and record["machine"]["cpu_capability"]
    for library in ("transformers", "deepspeed", "ray", "numpy", "pyarrow"):
        assert record["machine"][library], library
    return record


def load_benchmark(script: str):
    """A benchmark script as a module (registered, so that its dataclasses can resolve their annotations)."""
    name = f"benchmarks_{Path(script).stem}"
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.ray
@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_run_appends_one_record(script, tmp_path):
    scratch = tmp_path / "scratch" / "made"
    takes_tmp_dir = script in SCRIPTS_WITH_A_TMP_DIR
    record = run_quick(script, tmp_path / "out", ["--tmp-dir", str(scratch)] if takes_tmp_dir else [])
    if takes_tmp_dir:  # made, and left empty once the run_dir made in it is removed
        assert scratch.is_dir() and not list(scratch.iterdir())
    if script in SCRIPTS_WITH_A_REFERENCE:
        assert list(record["config"]["reference_sha256"]) == ["model.safetensors"]
        assert record["config"]["resolved_config"]["episode"]["max_turns"] >= 1


@pytest.mark.parametrize("script", sorted(RAY_FREE_ARGS))
def test_quick_run_without_ray_appends_one_record(script, tmp_path):
    record = run_quick(script, tmp_path, RAY_FREE_ARGS[script])
    assert record["config"]["quick"] is True


def test_the_rollouts_benchmark_refuses_a_config_of_another_engine(tmp_path):
    """Its ratios compare Ray Data actors with the transformers engine in-process: with vLLM they would be
    ratios of two engines."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "rollouts.py"), "--config", "jobs/qwen2.5-3b-metamath.yaml", "--out", str(tmp_path)],
        cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert done.returncode == 2 and not list(tmp_path.iterdir())
    assert "jobs/qwen2.5-3b-metamath.yaml: rollout.engine=vllm; this benchmark times the transformers engine" in done.stderr


def test_the_two_process_row_ends_with_the_error_of_an_engine_that_fails_to_load(tmp_path):
    """Before, its two processes waited for each other, and the benchmark for their results, for ever."""
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "import rollouts\n"
        "if __name__ == '__main__':\n"
        f"    rollouts.measure_two_processes({str(tmp_path / 'no-model')!r}, {{'batches': [[], []]}})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 1
    assert str(tmp_path / "no-model") in done.stderr.strip().splitlines()[-1]


def test_a_result_line_appended_before_does_not_make_the_commit_dirty(tmp_path):
    record = load_benchmark("record.py")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-C", str(tmp_path)]
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "weights.jsonl").write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "benchmarks" / "results" / "weights.jsonl").write_text("{}\n{}\n")  # an earlier run's line
    assert record.commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert record.commit(tmp_path) == f"{head}-dirty"


def test_result_lines_name_places_instead_of_machine_paths(tmp_path, monkeypatch):
    record = load_benchmark("record.py")
    monkeypatch.setenv("DRIFT_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    in_tmp = tmp_path.resolve().relative_to(Path(tempfile.gettempdir()).resolve())
    config = {
        "config": str(BENCHMARKS.parent / "jobs" / "demo_cpu.yaml"),
        "reference": str(tmp_path / "cache" / "models" / "demo-1"),  # the cache inside tmp: the innermost place names it
        "work": (str(tmp_path / "run"), str(tmp_path / "home" / "data.jsonl")),
        "kept": ["/srv/data.jsonl", "</answer>", "jobs/smoke.yaml", 3, None],
    }
    path = record.append_result("quality", config, [{"method": "drift", "run_dir": str(tmp_path / "run")}], tmp_path / "out")
    line = json.loads(path.read_text())
    assert line["config"] == {
        "config": "jobs/demo_cpu.yaml",
        "reference": "<cache>/models/demo-1",
        "work": [f"<tmp>/{in_tmp}/run", "~/data.jsonl"],
        "kept": ["/srv/data.jsonl", "</answer>", "jobs/smoke.yaml", 3, None],
    }
    assert line["results"] == [{"method": "drift", "run_dir": f"<tmp>/{in_tmp}/run"}]


def test_weight_checksums_are_what_sha256sum_prints_and_tell_two_models_apart(tmp_path):
    record = load_benchmark("record.py")
    first = save_untrained_demo_model(tmp_path / "first", seed=0)
    again = save_untrained_demo_model(tmp_path / "again", seed=0)
    other = save_untrained_demo_model(tmp_path / "other", seed=1)
    checksums = record.weight_checksums(first)
    printed = subprocess.run(["sha256sum", "model.safetensors"], cwd=first, capture_output=True, text=True, check=True)
    assert checksums == {"model.safetensors": printed.stdout.split()[0]}
    assert record.weight_checksums(again) == checksums != record.weight_checksums(other)
    assert record.weight_checksums("Qwen/Qwen2.5-3B-Instruct") is None
    assert record.weight_checksums(str(tmp_path)) is None  # a directory without weight files


def test_the_weights_benchmark_loop_is_the_weights_formula():
    """The per-row loop the core is compared with computes the core's weights, blank answers included."""
    benchmark = load_benchmark("weights.py")
    table = benchmark.synthetic_trajectories(200, 4, seed=1)
    answers = table.column(schema.ANSWER_NORMS).to_pylist()
    answers[0] = [" ", "7", "7", ""]  # blanks are not answers: repetition 1 − 1/2
    table = table.set_column(table.schema.get_field_index(schema.ANSWER_NORMS), schema.ANSWER_NORMS, pa.array(answers))
    cfg = WeightsConfig(beta=0.3, gamma=0.8, rep_lambda=0.4)
    expected = compute_weights(table, cfg).column(schema.WEIGHT).to_numpy()
    assert len(set(np.round(expected, 6))) > 10
    np.testing.assert_allclose(benchmark.per_row_loop(table.to_pylist(), cfg), expected, rtol=1e-9, atol=1e-12)
    # Longer replies: text the file entry reads and checks, the weights none of.
    long = benchmark.synthetic_trajectories(200, 4, seed=1, reply_chars=150)
    reply = long.column(schema.MESSAGES)[0].as_py()[-1]["content"]
    assert len(reply) == 150 + len("<answer>1</answer>") and "×" in reply and reply.endswith("<answer>1</answer>")


def test_quality_checks_compare_each_drift_row_with_sft_of_its_round():
    quality = load_benchmark("quality.py")

    def row(method, multi1, multi5, std5, per_seed=(0.4, 0.5, 0.6)):
        return {"method": method, "multi@1_mean": multi1, "multi@5_mean": multi5, "multi@5_std": std5,
                "multi@5_per_seed": list(per_seed)}

    rows = [
        row("reference", 0.30, 0.35, 0.01),
        row("drift", 0.30, 0.50, 0.02, per_seed=(0.45, 0.50, 0.55)),
        row("drift_round2", 0.30, 0.52, 0.05),
        row("uniform", 0.30, 0.40, 0.01, per_seed=(0.40, 0.41, 0.57)),
        row("uniform_round2", 0.30, 0.45, 0.02),
    ]
    checks = quality.evidence_checks(rows)
    assert checks[0] == "reference greedy multi@5 − acc@1 = +0.050"
    assert "uniform_round2 multi@5 − acc@1 = +0.150" in checks
    assert "drift multi@5 − uniform multi@5 = +0.100; 2 × the larger seed std = 0.040: drift ahead beyond seed noise" in checks
    # round 2 is compared with SFT's round 2, and its larger std makes the same kind of gap noise
    assert "drift_round2 multi@5 − uniform_round2 multi@5 = +0.070; 2 × the larger seed std = 0.100: NOT beyond seed noise" in checks
    assert sum(check.endswith("seed noise") for check in checks) == 2  # SFT rows are not compared with themselves
    # paired by seed: the differences +0.05 +0.09 −0.02 have mean +0.04 and sample std 0.0557
    assert "drift − uniform multi@5 paired by seed = +0.040 ± 0.056 (+0.050 +0.090 -0.020); drift ahead in 2 of 3 seeds" in checks
    # A gap as large the other way is beyond noise too, and says so.
    behind = quality.evidence_checks([rows[0], row("drift", 0.30, 0.30, 0.02), row("uniform", 0.30, 0.40, 0.01)])
    assert "drift multi@5 − uniform multi@5 = -0.100; 2 × the larger seed std = 0.040: drift behind beyond seed noise" in behind
    # One seed has no std: the gap is not judged against a noise of 0.
    one_seed = quality.evidence_checks(
        [rows[0], row("drift", 0.30, 0.50, None, per_seed=(0.5,)), row("uniform", 0.30, 0.40, None, per_seed=(0.4,))]
    )
    assert "drift multi@5 − uniform multi@5 = +0.100; seed noise unknown: a std needs 2 seeds" in one_seed
    assert "drift − uniform multi@5 paired by seed = +0.100 (+0.100); drift ahead in 1 of 1 seeds" in one_seed


def test_quality_averages_the_turn_2_correction_rate_over_the_seeds_where_it_is_defined():
    quality = load_benchmark("quality.py")

    def run(correction_at_2):
        metrics = {key: 0.5 for key in quality.METRICS if key != "correction@2"}
        return {"metrics": {**metrics, "correction_rate": {} if correction_at_2 is None else {"2": correction_at_2}}}

    runs = {(0, "reference"): run(None), (1, "reference"): run(0.1), (2, "reference"): run(0.3)}
    [reference] = quality.summary_rows(runs, [0, 1, 2], labels=[])
    assert reference["correction@2_per_seed"] == [None, 0.1, 0.3]
    assert reference["correction@2_mean"] == pytest.approx(0.2)  # no seed played turn 2: left out, not a 0
    assert reference["correction@2"] == "0.200 ± 0.141 (2 seeds)" and reference["multi@1"] == "0.500 ± 0.000"
    # Defined in no seed (every problem solved at turn 1): null in the results line, which JSON can hold.
    [reference] = quality.summary_rows({(0, "reference"): run(None)}, [0], labels=[])
    assert (reference["correction@2_mean"], reference["correction@2_std"], reference["correction@2"]) == (None, None, "– (0 seeds)")
    assert (reference["multi@1"], reference["multi@1_std"]) == ("0.500", None)  # one seed: no spread to show
    json.dumps(reference, allow_nan=False)


def test_quality_gives_no_stage_times_for_a_method_whose_runs_were_reused():
    quality = load_benchmark("quality.py")
    metrics = {key: 0.5 for key in quality.METRICS if key != "correction@2"} | {"correction_rate": {"2": 0.1}}

    def run(reused: bool, seconds: float):
        timings = {stage: seconds for stage in quality.STAGES}
        return {"metrics": metrics, "timings_s": timings, "reused": reused, "weight_share": {"1": 1.0}}

    runs = {(seed, "reference"): {"metrics": metrics} for seed in (0, 1)}
    runs |= {(0, "drift"): run(False, 30.0), (1, "drift"): run(False, 50.0)}
    runs |= {(0, "uniform"): run(False, 30.0), (1, "uniform"): run(True, 0.1)}
    _, drift, uniform = quality.summary_rows(runs, [0, 1], labels=["drift", "uniform"])
    assert drift["weighted_sft_s"] == 40.0 and "reused_in_seeds" not in drift
    assert uniform["weighted_sft_s"] is None and uniform["reused_in_seeds"] == [1]


def test_quality_methods_run_every_mode_for_the_rounds_and_drift_at_each_beta():
    quality = load_benchmark("quality.py")
    methods = quality.comparison_methods(["drift", "uniform", "success_only"], [0.5], rounds=2)
    labels = [label for method in methods for label in method.round_labels()]
    assert labels == ["drift", "drift_round2", "drift_beta0.5", "uniform", "uniform_round2", "success_only", "success_only_round2"]
    assert [m.overrides for m in methods if m.label == "drift_beta0.5"] == [("weights.beta=0.5",)]


def one_episode_shard(shard_dir: Path, cfg, prompt_id: str, completion_tokens: int) -> None:
    """A shard of one episode of the problem `prompt_id`, solved at turn 1 in `completion_tokens` tokens."""
    from drift_ray.episode import Episode, Generation, episodes_table, first_messages
    from drift_ray.prompts import Problem
    from drift_ray.rollouts import shard_path
    from drift_ray.trajectories import write_table_atomic
    from drift_ray.verifiers import ExactVerifier

    problem = Problem(prompt_id, "What is 2+2?", "4")
    episode = Episode(problem, 0, first_messages(problem.question, cfg.episode))
    episode.take_turn(Generation("<answer>4</answer>", 10, completion_tokens), ExactVerifier(), cfg.episode)
    write_table_atomic(episodes_table([episode], cfg.episode, "m"), shard_path(shard_dir, [problem]))


def test_end_to_end_gives_every_round_its_rollouts_and_training_figures(tmp_path):
    from drift_ray.config import load_config
    from drift_ray.train import STATS_FILE
    from drift_ray.trajectories import write_json_atomic

    end_to_end = load_benchmark("end_to_end.py")
    cfg = load_config(None, [f"run_dir={tmp_path}", "rounds=2"])
    one_episode_shard(tmp_path / "eval" / "drift", cfg, "test-1", 9)
    models = {}
    for label, training_s in (("drift", 20.0), ("drift_round2", 15.0)):
        models[label] = tmp_path / label
        write_json_atomic({"tokens": 1000, "steps": 4, "seconds": training_s}, models[label] / STATS_FILE)
    result = {
        "timings_s": {"rollouts": 10.0, "weights": 1.0, "weighted_sft": 30.0, "rollouts_round2": 8.0,
                      "weights_round2": 1.0, "weighted_sft_round2": 25.0, "evaluation": 3.0},
        # What this run generated, wherever its rollouts are kept.
        "work_by_round": [{"rollouts": {"trajectories": 16, "completion_tokens": 100}},
                          {"rollouts": {"trajectories": 16, "completion_tokens": 80}}],
        "models": models,
    }
    rows = {row["stage"]: row for row in end_to_end.stage_rows(result, "drift", tmp_path, {"drift": 0.5})}
    assert (rows["rollouts_round2"]["completion_tokens"], rows["rollouts_round2"]["tokens_per_steady_s"]) == (80, 10.0)
    assert (rows["weighted_sft"]["startup_s"], rows["weighted_sft_round2"]["startup_s"]) == (10.0, 10.0)
    assert rows["weighted_sft_round2"]["tokens_per_steady_s"] == 1000 / 15.0
    assert (rows["evaluation"]["completion_tokens"], rows["evaluation"]["final_multi"]) == (9, {"drift": 0.5})
    assert rows["total"]["seconds"] == 78.0
    result["work_by_round"][1]["rollouts"] = {"reused": 8, "new": 0}  # generated nothing: not measured
    rows = {row["stage"]: row for row in end_to_end.stage_rows(result, "drift", tmp_path, {"drift": 0.5})}
    assert (rows["rollouts_round2"]["completion_tokens"], rows["rollouts_round2"]["tokens_per_steady_s"]) == (None, None)


def finished_drift_run(
    run_dir: Path, cfg, timings: dict[str, float], took_over: dict | None = None, wrote_record: bool = True
) -> None:
    """What `drift-ray run` of `cfg` leaves in run_dir: one prompt's rollouts (7 tokens), eval.json, the
    training's statistics (30 s) and run.json: the config, `timings` and what the run took over from
    earlier ones: nothing, but for `took_over` (no run.json without `wrote_record`, as an older drift-ray)."""
    from drift_ray.trajectories import write_json_atomic

    # Beside another run's prompt (5 tokens), which a shared rollout.output_dir holds too.
    for prompt_id, tokens in (("p", 7), ("another-run", 5)):
        one_episode_shard(run_dir / "rollouts", cfg, prompt_id, tokens)
    metrics = {"drift": {"multi@1": 0.4, "multi@3": 0.45, "multi@5": 0.5}}
    write_json_atomic(metrics, run_dir / "eval" / "eval.json")
    write_json_atomic({"wall_seconds": 30.0}, run_dir / "train" / "model" / "drift_train.json")
    work = {"rollouts": {"problems": 1, "reused": 0, "new": 1, "completion_tokens": 7}, "weights_reused": False, "model_reused": False,
            "resumed_from_step": 0} | (took_over or {})
    (run_dir / "run.json").unlink(missing_ok=True)
    if wrote_record:
        record = {"config": cfg.model_dump(mode="json"), "timings_s": timings, "work_by_round": [work], "metrics": metrics}
        write_json_atomic(record, run_dir / "run.json")


def test_online_rl_takes_drift_s_cost_only_from_a_run_that_did_the_work(tmp_path):
    from drift_ray.config import load_config
    from drift_ray.trajectories import write_json_atomic

    online_rl = load_benchmark("online_rl.py")
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    timings = {"rollouts": 20.0, "weights": 2.0, "weighted_sft": 33.0}
    finished_drift_run(tmp_path, cfg, timings)
    point = online_rl.drift_point(tmp_path, cfg)
    assert (point["seconds"], point["generated_tokens"], point["multi@5"]) == (55.0, 7, 0.5)

    # The run's own evaluation, not the report a later `drift-ray eval` in its run_dir wrote.
    write_json_atomic({"other": {"multi@1": 0.9, "multi@5": 0.9}}, tmp_path / "eval" / "eval.json")
    assert online_rl.drift_point(tmp_path, cfg)["multi@5"] == 0.5
    record = json.loads((tmp_path / "run.json").read_text())
    del record["metrics"]  # as an older drift-ray wrote it
    write_json_atomic(record, tmp_path / "run.json")
    with pytest.raises(SystemExit, match=r"run\.json: no metrics \(a run of an older drift-ray"):
        online_rl.drift_point(tmp_path, cfg)

    # The last turn's multi@k, named by its turn.
    three_turns = load_config(None, [f"run_dir={tmp_path}", "episode.max_turns=3"])
    finished_drift_run(tmp_path, three_turns, timings)
    assert online_rl.drift_point(tmp_path, three_turns)["multi@3"] == 0.45

    for took_over in [
        {"rollouts": {"problems": 1, "reused": 1, "new": 0}},  # killed after the rollouts
        {"weights_reused": True},
        {"model_reused": True},  # a rerun of a finished run
        {"resumed_from_step": 3},  # killed in training
    ]:
        finished_drift_run(tmp_path, cfg, timings, took_over)
        with pytest.raises(SystemExit, match="the last run took over work an earlier run did"):
            online_rl.drift_point(tmp_path, cfg)
    finished_drift_run(tmp_path, cfg, timings, wrote_record=False)
    with pytest.raises(SystemExit, match=r"no run\.json \(not a finished run, or one of an older drift-ray\)"):
        online_rl.drift_point(tmp_path, cfg)


def test_reused_work_counts_reused_rollouts_only_where_the_round_was_to_sample_them_and_any_wait():
    record = load_benchmark("record.py")
    work = {"rollouts": {"reused": 8, "new": 0}, "weights_reused": False, "model_reused": False, "resumed_from_step": 0}
    assert record.reused_work(work, samples_rollouts=True)
    assert not record.reused_work(work, samples_rollouts=False)  # a later method of a seed shares the first's
    assert record.reused_work({**work, "weights_reused": True}, samples_rollouts=False)
    sampled = {**work, "rollouts": {"reused": 0, "new": 8, "waited_seconds": 0.0}}
    assert not record.reused_work(sampled, samples_rollouts=True)
    # Its seconds include another run's turn at shared rollouts.
    assert record.reused_work({**sampled, "rollouts": {**sampled["rollouts"], "waited_seconds": 2.5}}, samples_rollouts=True)


@pytest.mark.parametrize(
    "overrides, found",
    [
        (["rollout.gpus_per_actor=1"], "rollout.gpus_per_actor=1, rollout.dtype=auto, train.use_gpu=false"),
        (["train.use_gpu=true"], "rollout.gpus_per_actor=0, rollout.dtype=auto, train.use_gpu=true"),
        (["rollout.engine=vllm", "rollout.gpus_per_actor=1"], "rollout.engine=vllm"),
        (["rollout.dtype=bfloat16"], "rollout.dtype=bfloat16"),
        (["train.bf16=true"], "train.bf16=true"),
        (["train.lora.enabled=true"], "train.lora.enabled=true"),
    ],
)
def test_online_rl_compares_with_drift_only_as_it_runs_itself_on_the_cpu_training_every_weight(tmp_path, overrides, found):
    from drift_ray.config import load_config

    online_rl = load_benchmark("online_rl.py")
    online_rl.require_comparable_drift(load_config(None, []), "jobs/demo_cpu.yaml")
    with pytest.raises(SystemExit, match=f"c.yaml: DRIFT must run as the online baseline does, .*found .*{re.escape(found)}"):
        online_rl.require_comparable_drift(load_config(None, overrides), "c.yaml")
    # A finished run of another device is refused as well.
    run = load_config(None, [f"run_dir={tmp_path}", *overrides])
    finished_drift_run(tmp_path, run, {"rollouts": 20.0, "weights": 2.0, "weighted_sft": 33.0})
    with pytest.raises(SystemExit, match="run.json: DRIFT must run as the online baseline does"):
        online_rl.drift_point(tmp_path, load_config(None, [f"run_dir={tmp_path / 'online'}"]))


def test_online_rl_refuses_a_drift_run_before_the_online_updates(tmp_path, monkeypatch):
    online_rl = load_benchmark("online_rl.py")

    def train_online(*args, **kwargs):
        raise AssertionError("the online updates ran before --drift-run was checked")

    monkeypatch.setattr(online_rl, "train_online", train_online)
    monkeypatch.setattr(sys, "argv", ["online_rl.py", "--quick", "--drift-run", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"no run\.json \(not a finished run"):
        online_rl.main()


def test_online_rl_compares_only_with_a_drift_run_of_its_problems_and_episodes(tmp_path):
    from drift_ray.config import load_config

    online_rl = load_benchmark("online_rl.py")
    # How DRIFT trains, and how many actors evaluate it, are the run's own.
    run = load_config(None, [f"run_dir={tmp_path}", "weights.beta=0.5", "eval.num_actors=1"])
    finished_drift_run(tmp_path, run, {"rollouts": 20.0, "weights": 2.0, "weighted_sft": 33.0})
    online = load_config(None, [f"run_dir={tmp_path / 'online'}"])
    assert online_rl.drift_point(tmp_path, online)["seconds"] == 55.0
    for override, differs in [
        ("episode.max_turns=3", "config.episode.max_turns (5 then, 3 now)"),
        ("seed=7", "config.seed"),
        ("eval.max_new_tokens=9", "config.eval.max_new_tokens (None then, 9 now)"),
    ]:
        online = load_config(None, [f"run_dir={tmp_path / 'online'}", override])
        message = rf"--drift-run {re.escape(str(tmp_path))}: made with other settings \(differ in: {re.escape(differs)}"
        with pytest.raises(RuntimeError, match=message):
            online_rl.drift_point(tmp_path, online)


@pytest.mark.parametrize(
    "argv, message",
    [
        # A seed run twice would count as two seeds with the same multi@5, shrinking the std that judges the gap.
        (["--seeds", "0", "1", "0"], "argument --seeds: 0 given more than once; each seed is one sample of the spread"),
        (["--betas", "0.5", "0.50"], "argument --betas: 0.5 given more than once; each β is one row, named by its value"),
        (["--betas", "0.5", "0.5000001"], "argument --betas: 0.5 given more than once; each β is one row, named by its value"),
        (["--modes", "drift", "uniform", "drift"], "argument --modes: drift given more than once; each mode is one row"),
        (["--rounds", "0"], "argument --rounds: 0 rounds; a run has 1 or more"),
        (["--seeds", "0", "-1"], "argument --seeds: -1 is negative; a seed is 0 or more"),
    ],
)
def test_quality_refuses_repeated_values_and_impossible_rounds_or_seeds_at_parsing(argv, message, tmp_path, capsys):
    quality = load_benchmark("quality.py")
    with pytest.raises(SystemExit) as exit_:
        quality.parse_arguments([*argv, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quality_accepts_distinct_values_and_the_empty_beta_list(tmp_path):
    quality = load_benchmark("quality.py")
    _, args = quality.parse_arguments(["--seeds", "2", "0", "--betas", "--rounds", "1", "--out", str(tmp_path)])
    assert (args.seeds, args.betas, args.rounds) == ([2, 0], [], 1)


def test_quality_stops_before_any_work_on_a_repeated_seed(tmp_path):
    """The refusal comes from the command line itself, before the demo reference (minutes) is built."""
    # A config that does not exist: read any later than the arguments, it would fail there instead.
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "quality.py"), "--config", str(tmp_path / "missing.yaml"), "--seeds", "3", "3",
         "--out", str(tmp_path / "out")],
        cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert done.returncode == 2 and "argument --seeds: 3 given more than once" in done.stderr, done.stderr[-3000:]
    assert not list(tmp_path.iterdir())


def test_quality_refuses_a_results_file_whose_last_line_was_cut_short_before_running(tmp_path, capsys):
    quality = load_benchmark("quality.py")
    (tmp_path / "quality.jsonl").write_text('{"benchmark": "quality"}\n{"benchmark": "qua')
    with pytest.raises(SystemExit) as exit_:
        quality.parse_arguments(["--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert f"{tmp_path / 'quality.jsonl'}: its last line is incomplete" in capsys.readouterr().err


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_checks_the_results_file_it_will_append_to_when_it_parses_its_arguments(script):
    # Its parser is the one that refuses a cut-short file of its own results, before any work.
    source = (BENCHMARKS / script).read_text()
    name = Path(script).stem
    assert f'argument_parser(__doc__, "{name}")' in source
    assert re.search(rf"""append_result\(\s*["']{name}["']""", source)


def test_a_quick_run_keeps_its_line_out_of_the_committed_results_unless_told_where(tmp_path, capsys):
    record = load_benchmark("record.py")
    parser = record.argument_parser("Doc.", "weights")
    assert parser.parse_args([]).out == record.RESULTS
    quick = parser.parse_args(["--quick"]).out
    assert quick != record.RESULTS and quick.is_dir() and not list(quick.iterdir())
    assert f"--quick: this smoke test's line goes to {quick}, not to the committed results" in capsys.readouterr().err
    assert parser.parse_args(["--quick", "--out", str(tmp_path)]).out == tmp_path
    quick.rmdir()


def test_a_size_option_takes_its_quick_size_with_quick_unless_given(tmp_path, capsys):
    record = load_benchmark("record.py")
    parser = record.argument_parser("Doc.", "weights")
    record.add_size_option(parser, "--prompts-per-update", full=32, quick=2, help="problems")
    out = ["--out", str(tmp_path)]
    assert parser.parse_args(out).prompts_per_update == 32
    assert parser.parse_args([*out, "--quick"]).prompts_per_update == 2
    assert parser.parse_args([*out, "--quick", "--prompts-per-update", "5"]).prompts_per_update == 5  # not dropped
    assert "(default 32; 2 with --quick)" in " ".join(parser.format_help().split())
    for value, problem in (("0", "0 is below 1, the least it takes"), ("1.5", "'1.5' is not a whole number")):
        with pytest.raises(SystemExit):
            parser.parse_args([*out, "--prompts-per-update", value])
        assert f"error: argument --prompts-per-update: {problem}" in capsys.readouterr().err


def test_the_benchmark_parser_refuses_an_out_or_tmp_dir_that_cannot_be_a_directory(tmp_path, capsys):
    record = load_benchmark("record.py")
    parser = record.argument_parser("Doc.", "online_rl")
    record.add_tmp_dir_option(parser)
    (a_file := tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", str(a_file)])
    assert f"error: argument --out: {a_file} is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", str(tmp_path), "--tmp-dir", str(a_file / "under")])
    assert f"error: argument --tmp-dir: cannot make directory {a_file / 'under'}: Not a directory" in capsys.readouterr().err


RUN_BENCHMARK = """
import sys, tempfile, time
sys.path.insert(0, {benchmarks!r})
from record import run_benchmark

def main():
    if sys.argv[1] == "error":
        raise ValueError("c.yaml: invalid config")
    with tempfile.TemporaryDirectory(dir=sys.argv[2]) as tmp:
        print(tmp, flush=True)
        time.sleep(120)

run_benchmark(main)
"""


def test_a_benchmark_ends_of_an_error_in_one_line_and_of_sigterm_without_its_temporary_directories(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text(RUN_BENCHMARK.format(benchmarks=str(BENCHMARKS)))
    failed = subprocess.run([sys.executable, str(script), "error"], capture_output=True, text=True, timeout=60)
    assert (failed.returncode, failed.stderr) == (2, "bench.py: error: c.yaml: invalid config\n")
    shown = subprocess.run([sys.executable, str(script), "error", "--traceback"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 1 and "Traceback" in shown.stderr and "ValueError: c.yaml: invalid config" in shown.stderr
    with subprocess.Popen([sys.executable, str(script), "sleep", str(tmp_path)], stdout=subprocess.PIPE, text=True) as killed:
        made = Path(killed.stdout.readline().strip())
        assert made.is_dir()
        killed.terminate()  # `kill`, `timeout`: as Ctrl-C, the directory goes with the run, which ends of the signal
        assert killed.wait(timeout=60) == -signal.SIGTERM
    assert not made.exists()


@pytest.mark.parametrize(
    "script, argv, problem",
    [
        ("weights.py", ["--trajectories", "1000", "--k", "16"], "argument --trajectories: 1,000 is not a multiple of --k 16"),
        ("weights.py", ["--k", "0"], "argument --k: 0 is below 1"),
        ("rollouts.py", ["--prompts", "-3"], "argument --prompts: -3 is below 1"),
        ("rollouts.py", ["--model", "no-such-model"], "argument --model: no-such-model is not a directory"),
        ("sft.py", ["--micro-batch", "0"], "argument --micro-batch: 0 is below 1"),
        ("memory.py", ["--steps", "0"], "argument --steps: 0 is below 1"),
        ("online_rl.py", ["--quick", "--samples-per-prompt", "1"], "argument --samples-per-prompt: 1 is below 2"),
        ("online_rl.py", ["--lr", "nan"], "argument --lr: nan is not a finite number of at least 0"),
        ("quality.py", ["--betas", "0.1"], "argument --betas: 0.1 is the config's weights.beta, which the drift method runs"),
        ("quality.py", ["task.num_trian=8"], "quality.py: error: "),
    ],
)
def test_a_benchmark_refuses_sizes_that_cannot_run_before_any_work(script, argv, problem, tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *argv, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and problem in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_a_benchmark_s_help_describes_it_in_whole_sentences():
    record = load_benchmark("record.py")
    doc = """Throughput of the weights stage: the file entry (Parquet or JSONL
    in), the Ray Data map stage.

    Details that --help leaves out."""
    assert record.argument_parser(doc, "weights").description == (
        "Throughput of the weights stage: the file entry (Parquet or JSONL in), the Ray Data map stage."
    )


def test_the_benchmark_parser_refuses_a_cut_short_results_file_of_its_benchmark_alone(tmp_path, capsys):
    record = load_benchmark("record.py")
    (tmp_path / "sft.jsonl").write_text('{"benchmark": "sf')
    assert record.argument_parser("Doc.", "memory").parse_args(["--out", str(tmp_path)]).out == tmp_path
    with pytest.raises(SystemExit):
        record.argument_parser("Doc.", "sft").parse_args(["--out", str(tmp_path)])
    assert f"{tmp_path / 'sft.jsonl'}: its last line is incomplete" in capsys.readouterr().err


def test_a_result_line_is_not_glued_onto_a_line_an_interrupted_append_left_incomplete(tmp_path, monkeypatch):
    record = load_benchmark("record.py")
    results = tmp_path / "quality.jsonl"
    cut_short = '{"benchmark": "quality", "results": [{"method": "drift"}]}\n{"benchmark": "quality", "res'
    results.write_text(cut_short)
    with pytest.raises(ValueError, match=rf"{re.escape(str(results))}: its last line is incomplete") as refused:
        record.append_result("quality", {"seeds": [0]}, [{"method": "drift"}], tmp_path)
    assert results.read_text() == cut_short
    # The refused run's line comes with the refusal, to append by hand once the file is mended.
    assert json.loads(str(refused.value).splitlines()[-1])["config"] == {"seeds": [0]}
    # A file of whole lines, or no file yet, takes the line, which is on disk before the call returns.
    synced = []  # whether each fsync was of a directory
    real_fsync = record.os.fsync
    monkeypatch.setattr(record.os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real_fsync(fd))
    results.write_text(cut_short[: cut_short.index("\n") + 1])
    record.append_result("quality", {"seeds": [0]}, [{"method": "drift"}], tmp_path)
    record.append_result("fresh", {"seeds": [1]}, [{"method": "drift"}], tmp_path)
    assert [json.loads(line).get("config") for line in results.read_text().splitlines()] == [None, {"seeds": [0]}]
    assert json.loads((tmp_path / "fresh.jsonl").read_text())["config"] == {"seeds": [1]}
    assert synced == [False, False, True]  # both appends; the new file's directory, as its name is new
