"""Outputs that a Ray job submitted with a working_dir would leave in Ray's copy of it: warned of, from the
job's runtime_env as Ray passes it (no Ray here; a real job on a `ray start` head node is in
test_pipeline.py)."""

import json
import logging
from pathlib import Path

import pytest

from drift_ray.cli import main
from drift_ray.pipeline import RAY_JOB_CONFIG_ENV, outputs_left_in_the_job

AUTHORS_SAMPLE = Path(__file__).parent / "fixtures" / "authors_sample.jsonl"


def job(runtime_env) -> dict[str, str]:
    """The environment Ray gives a submitted job's entrypoint, for `runtime_env`."""
    return {RAY_JOB_CONFIG_ENV: json.dumps({"runtime_env": runtime_env, "metadata": {}})}


def keys_warned_of(outputs, environ) -> list[str]:
    return [problem.split(" is relative")[0] for problem in outputs_left_in_the_job(outputs, environ)]


def test_relative_outputs_are_warned_of_in_a_job_whose_working_dir_ray_copies():
    outputs = {"run_dir": "runs/x", "rollout.output_dir": None, "--output": "/shared/weighted.parquet"}
    assert keys_warned_of(outputs, job({"working_dir": "gcs://_ray_pkg_0123abcd.zip"})) == ["run_dir=runs/x"]
    assert keys_warned_of({"rollout.output_dir": "rollouts"}, job({"working_dir": "s3://bucket/code.zip"})) == [
        "rollout.output_dir=rollouts"
    ]


@pytest.mark.parametrize(
    "environ",
    [
        {},  # not a Ray job: relative to where the user runs it
        job({}),  # a job without a working_dir runs in no copy of Ray's
        job(None),
        job({"working_dir": "local:///mnt/code"}),  # used in place, not copied
        {RAY_JOB_CONFIG_ENV: "[]"},
        {RAY_JOB_CONFIG_ENV: "not JSON"},
    ],
    ids=["no-job", "no-working-dir", "null-runtime-env", "local-working-dir", "a-list", "not-json"],
)
def test_nothing_is_warned_of_outside_a_job_that_runs_in_a_copy(environ):
    assert outputs_left_in_the_job({"run_dir": "runs/x"}, environ) == []


def test_drift_ray_weights_warns_of_a_relative_output_in_such_a_job(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, job({"working_dir": "gcs://_ray_pkg_0123abcd.zip"})[RAY_JOB_CONFIG_ENV])
    caplog.set_level(logging.WARNING, logger="drift_ray")
    assert main(["weights", "--input", str(AUTHORS_SAMPLE), "--output", "weighted.parquet"]) == 0
    assert f"--output=weighted.parquet is relative to the directory this process runs in ({tmp_path})" in caplog.text
    assert "Give an absolute --output on storage that outlives the job" in caplog.text
