"""benchmarks/constraints.txt pins the environment behind the committed benchmark results: every dependency
of drift-ray within its declared range, and the library versions the newest results record. .ci/floors.txt
pins the floors pyproject.toml declares, for `bash .ci/floors`. cluster/gpu-constraints.txt pins the GPU
clusters' packages, vLLM and torch included (tests/test_cluster.py checks them against the clusters)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "benchmarks" / "constraints.txt"
# setup.sh installs torch itself, before anything else; vllm is a GPU extra, outside the CPU environment.
NOT_PINNED = {"torch", "vllm"}


FLOORS = ROOT / ".ci" / "floors.txt"
GPU_LOCK = ROOT / "cluster" / "gpu-constraints.txt"


def pins(path: Path = CONSTRAINTS) -> dict[str, Version]:
    pinned = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert [s.operator for s in specifiers] == ["=="], f"{path.name}:{number}: {line!r} is not an exact pin"
        pinned[canonicalize_name(requirement.name)] = Version(specifiers[0].version)
    return pinned


def test_every_dependency_is_pinned_within_its_declared_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    pinned = pins()
    for requirement in map(Requirement, declared):
        name = canonicalize_name(requirement.name)
        if name in NOT_PINNED:
            assert name not in pinned, f"{name} is installed by setup.sh's own rule, not pinned here"
            continue
        assert name in pinned, f"{name} is a dependency but has no pin in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} is outside {requirement}"


def test_the_gpu_lock_pins_every_runtime_dependency_and_vllm_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = pins(GPU_LOCK)
    for requirement in map(Requirement, [*project["dependencies"], *project["optional-dependencies"]["vllm"]]):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} is a dependency but has no pin in {GPU_LOCK.name}"
        assert requirement.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} is outside {requirement}"


def test_pins_are_the_library_versions_of_the_newest_results():
    recorded = []
    for path in (ROOT / "benchmarks" / "results").rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            # Lines older than the version fields do not say. A GPU machine's lines come from that machine's
            # packages, which these pins of the CPU environment do not fix.
            if "transformers" in record["machine"] and not record["machine"].get("gpu"):
                recorded.append((record["time"], path.relative_to(ROOT), record["machine"]))
    assert recorded, "no committed result records its library versions"
    _, name, machine = max(recorded, key=lambda entry: entry[0])
    pinned = pins()
    for library in ("transformers", "deepspeed", "ray"):
        assert pinned[library] == Version(machine[library]), f"{name}: {library} {machine[library]}, pinned {pinned[library]}"


def test_floors_are_the_lower_bounds_pyproject_declares():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lower_bounds = {}
    for requirement in map(Requirement, dependencies):
        for specifier in requirement.specifier:
            if specifier.operator == ">=":
                lower_bounds[canonicalize_name(requirement.name)] = Version(specifier.version)
    floors = pins(FLOORS)
    assert floors.keys() == lower_bounds.keys(), (
        f"{FLOORS.name} pins {sorted(floors)}; pyproject.toml bounds {sorted(lower_bounds)} from below"
    )
    for name, version in floors.items():
        assert version == lower_bounds[name], f"{FLOORS.name}: {name}=={version}, pyproject.toml: >={lower_bounds[name]}"
