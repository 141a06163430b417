"""What a local Ray cluster lacks to run a config: checked when drift-ray starts one, since a local
cluster never grows and Ray would wait for the missing resources forever; and how one is started, so
that its processes ask its own dashboard (no Ray here; the check's use in `drift-ray run`, and a real
cluster beside a `ray start` one, are in test_pipeline.py)."""

import logging
import socket
import types
from pathlib import Path

import pytest

from drift_ray.config import load_config
from drift_ray.pipeline import STAGES, local_cluster_shortfalls, stages_left

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def test_the_cpu_demo_fits_the_two_cores_it_asks_for():
    assert local_cluster_shortfalls(load_config(JOBS / "demo_cpu.yaml"), STAGES, {"CPU": 2.0}) == []


def test_the_gpu_demo_on_a_machine_without_a_gpu_names_both_gpu_settings():
    cfg = load_config(JOBS / "demo_gpu.yaml")
    assert local_cluster_shortfalls(cfg, STAGES, {"CPU": 2.0}) == [
        "one rollout or evaluation actor needs GPU 0.5 (rollout.gpus_per_actor), the cluster has 0",
        "the training workers need GPU 1 (train.use_gpu=true: one per worker × train.num_workers=1), the cluster has 0",
    ]
    assert local_cluster_shortfalls(cfg, STAGES, {"CPU": 16.0, "GPU": 1.0}) == []


@pytest.mark.parametrize(
    ("stages", "setting"),
    [(("rollouts",), "rollout.gpus_per_actor"), (("eval",), "rollout.gpus_per_actor"), (("train",), "train.use_gpu")],
)
def test_a_command_is_checked_for_the_stages_it_runs_only(stages, setting):
    shortfalls = local_cluster_shortfalls(load_config(JOBS / "demo_gpu.yaml"), stages, {"CPU": 2.0})
    assert len(shortfalls) == 1 and setting in shortfalls[0]


def test_training_needs_every_worker_at_once_but_an_actor_pool_only_one_actor():
    cfg = load_config(
        JOBS / "smoke.yaml",
        ["train.num_workers=2", "train.cpus_per_worker=1.5", "rollout.num_actors=8", "ray.num_cpus=2"],
    )
    assert local_cluster_shortfalls(cfg, STAGES, {"CPU": 2.0}) == [
        "the training workers need CPU 3 (train.cpus_per_worker=1.5 × train.num_workers=2), the cluster has 2 "
        "(ray.num_cpus)"
    ]
    assert local_cluster_shortfalls(cfg, STAGES, {"CPU": 3.0}) == []  # exactly enough


def test_custom_resources_of_a_cluster_node_type_are_named():
    cfg = load_config(JOBS / "qwen2.5-3b-metamath.yaml")
    shortfalls = local_cluster_shortfalls(cfg, STAGES, {"CPU": 128.0, "GPU": 8.0})
    assert shortfalls == [
        "one rollout or evaluation actor needs rollout_gpu 1 (rollout.resources.rollout_gpu), the cluster has 0",
        "the training workers need train_gpu 8 (train.resources.train_gpu=1 × train.num_workers=8), the cluster has 0",
    ]
    cpus = local_cluster_shortfalls(cfg, STAGES, {"CPU": 16.0, "GPU": 8.0, "rollout_gpu": 1.0, "train_gpu": 8.0})
    assert cpus == [
        "the training workers need CPU 80 (train.cpus_per_worker=10 × train.num_workers=8), the cluster has 16 "
        "(all of this machine's)"
    ]


def test_fractions_that_add_up_to_the_cluster_fit_it():
    cfg = load_config(JOBS / "smoke.yaml", ["train.num_workers=25", "train.cpus_per_worker=0.28",
                                            "train.global_batch_size=100", "train.micro_batch_size=4"])
    assert 0.28 * 25 > 7  # in floating point
    assert local_cluster_shortfalls(cfg, STAGES, {"CPU": 7.0}) == []
    assert len(local_cluster_shortfalls(cfg, STAGES, {"CPU": 6.9999})) == 1


def test_a_run_checks_the_stage_that_starts_ray_and_those_after_it():
    assert stages_left("rollouts", 1, 1) == ("rollouts", "train", "eval")
    assert stages_left("train", 1, 1) == ("train", "eval")
    assert stages_left("eval", 1, 1) == ("eval",)  # trained elsewhere: evaluation alone must fit
    assert stages_left("train", 1, 2) == STAGES  # round 2 still collects rollouts
    assert stages_left("train", 2, 2) == ("train", "eval")


class FakeRayStart:
    """ray.init and ray.shutdown of a local cluster whose dashboard serves at the addresses given in turn (None: it
    did not start); `taken` of them were lost to another process, which holds the port afterwards."""

    def __init__(self, dashboards: list[str | None], taken: int = 0):
        self.dashboards, self.taken, self.calls, self.holders = iter(dashboards), taken, [], []

    def init(self, **kwargs):
        self.calls.append(kwargs)
        url = next(self.dashboards)
        if url == "own":
            url = f"127.0.0.1:{kwargs['dashboard_port']}"
        elif url is None and self.taken:
            self.taken -= 1
            holder = socket.socket()
            holder.bind(("127.0.0.1", kwargs["dashboard_port"]))
            holder.listen()
            self.holders.append(holder)
        return types.SimpleNamespace(dashboard_url=url)


@pytest.mark.parametrize(
    "dashboards, taken, tries, said",
    [
        (["own"], 0, 1, None),
        # Another process took the port meanwhile: started again, on another port.
        ([None, "own"], 1, 2, None),
        # The dashboard failed otherwise, as it would again: Ray's own start, said.
        ([None, "unused"], 0, 1, "its dashboard did not start (Ray's error above says why)"),
        ([None, None, None, "unused"], 3, 3, "other processes took each port chosen for its dashboard"),
    ],
)
def test_a_local_cluster_s_processes_are_told_its_own_dashboard(monkeypatch, caplog, dashboards, taken, tries, said):
    import ray

    from drift_ray import pipeline

    fake = FakeRayStart(dashboards, taken)
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_OVERRIDE_DASHBOARD_URL", raising=False)
    try:
        with caplog.at_level(logging.INFO, logger="drift_ray"):
            pipeline.start_local_ray(2)
    finally:
        for holder in fake.holders:
            holder.close()
    told = [call for call in fake.calls if "runtime_env" in call]
    assert len(told) == tries and all(call["num_cpus"] == 2 and call["address"] == "local" for call in fake.calls)
    for call in told:
        assert call["runtime_env"] == {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{call['dashboard_port']}"}}
    assert len({call["dashboard_port"] for call in told}) == tries  # each try on a port of its own
    if said is None:
        assert len(fake.calls) == tries and "not told where its dashboard is" not in caplog.text
    else:
        assert len(fake.calls) == tries + 1 and "runtime_env" not in fake.calls[-1]
        assert f"the local cluster's processes are not told where its dashboard is ({said})" in caplog.text
    assert ("starting the cluster again with its dashboard on another port" in caplog.text) == bool(taken)


def test_a_dashboard_behind_a_proxy_is_taken_as_started(monkeypatch):
    """Under RAY_OVERRIDE_DASHBOARD_URL, Ray's context holds that URL, not the dashboard's own."""
    import ray

    from drift_ray import pipeline

    fake = FakeRayStart(["proxy.example/dashboard"])
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.setenv("RAY_OVERRIDE_DASHBOARD_URL", "https://proxy.example/dashboard")
    pipeline.start_local_ray(None)
    assert len(fake.calls) == 1 and "runtime_env" in fake.calls[0]
