#!/usr/bin/env bash
# One-step set-up: a virtual environment (.venv unless DRIFT_VENV says otherwise) with drift-ray installed in editable mode.
# Idempotent: a second run with an unchanged pyproject.toml returns at once.
#   PYTHON             the interpreter that makes the virtual environment (default: python3); where one exists,
#                      made by another Python version than PYTHON names, setup.sh stops and asks to remove it
#   DRIFT_TORCH_SPEC   torch requirement to install first (default: torch==2.13.0 on a machine without an
#                      NVIDIA GPU, a CPU build where the index serves one; the index's default build otherwise)
#   DRIFT_EXTRAS       extras to install (default: dev; add vllm on GPU machines: "dev,vllm")
#   DRIFT_CONSTRAINTS  a pip constraints file to install under (default: none). benchmarks/constraints.txt
#                      holds the versions behind the committed benchmark results; .ci/floors.txt the oldest
#                      versions pyproject.toml admits; cluster/gpu-constraints.txt those of the GPU clusters'
#                      nodes (with DRIFT_EXTRAS=vllm).
#   DRIFT_VENV         where the virtual environment goes (default: .venv)
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
extras=${DRIFT_EXTRAS:-dev}
venv=${DRIFT_VENV:-.venv}
gpu=
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpu=yes
  torch_spec=${DRIFT_TORCH_SPEC:-torch}
else
  torch_spec=${DRIFT_TORCH_SPEC:-torch==2.13.0}
fi
constraints=()
if [ -n "${DRIFT_CONSTRAINTS:-}" ]; then
  [ -f "$DRIFT_CONSTRAINTS" ] || { echo "setup.sh: DRIFT_CONSTRAINTS=$DRIFT_CONSTRAINTS is not a file" >&2; exit 2; }
  constraints=(--constraint "$DRIFT_CONSTRAINTS")
fi
# A virtual environment keeps the Python that made it: with PYTHON naming another version, going on would ignore
# PYTHON (or, had the packages changed, fail later with pip's confusing "No matching distribution" errors), so
# stop here instead. Without PYTHON, the environment's own Python is the one wanted.
minor_version_of='import sys; print("%d.%d" % sys.version_info[:2])'
if [ -n "${PYTHON:-}" ] && { [ -e "$venv"/bin/python ] || [ -L "$venv"/bin/python ]; }; then
  python_version=$("$python" -c "$minor_version_of" 2>/dev/null) ||
    { echo "setup.sh: cannot run the interpreter PYTHON=$python (Python 3.10 or newer)" >&2; exit 2; }
  venv_version=$("$venv"/bin/python -c "$minor_version_of" 2>/dev/null) || venv_version=
  if [ "$venv_version" != "$python_version" ]; then
    echo "setup.sh: $venv was made by ${venv_version:+Python }${venv_version:-a Python that no longer runs}," \
      "but $python (PYTHON) is Python $python_version: remove it (rm -rf $venv) and run setup.sh again, or set" \
      "DRIFT_VENV to another directory${venv_version:+, or PYTHON to a Python $venv_version}" >&2
    exit 2
  fi
fi
stamp_want="$(cat pyproject.toml ${DRIFT_CONSTRAINTS:+"$DRIFT_CONSTRAINTS"} | sha256sum | cut -c1-16) $torch_spec $extras"
if [ -f "$venv"/.drift-setup ] && [ "$(cat "$venv"/.drift-setup)" = "$stamp_want" ]; then
  exit 0
fi
# DeepSpeed compiles ops on first use (on CPU its communication op, always): fail here, not after the rollouts.
cxx=${CXX:-c++}
if ! command -v "${cxx%% *}" >/dev/null 2>&1 ||  # CXX may carry a launcher: "ccache g++"
  ! "$python" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  echo "setup.sh: DeepSpeed needs a C++ compiler ($cxx) and Python's headers (Python.h of $("$python" -c 'import sys; print(sys.executable)'))" \
    "to build its ops; on Debian or Ubuntu: apt install g++ python3-dev" >&2
  [ -n "$gpu" ] || exit 2  # on a GPU machine only ZeRO offload builds one (CPU Adam)
fi
[ -x "$venv"/bin/python ] || "$python" -m venv "$venv"
if ! "$venv"/bin/python -m pip --version >/dev/null 2>&1; then
  echo "setup.sh: $venv has no pip (was it made without ensurepip, e.g. before python3-venv was installed?);" \
    "delete it and run setup.sh again" >&2
  exit 2
fi
"$venv"/bin/python -m pip install --quiet --upgrade pip
# torch first: with it in place, the package's "torch>=2.4" is satisfied and no other build is pulled.
"$venv"/bin/python -m pip install --quiet "${constraints[@]}" "$torch_spec"
"$venv"/bin/python -m pip install --quiet "${constraints[@]}" -e ".[$extras]"
echo "$stamp_want" > "$venv"/.drift-setup
echo "drift-ray installed in $venv ($("$venv"/bin/python -c 'import torch; print("torch", torch.__version__)'))"
# Whether the pin got a CPU build depends on the package index pip reads; a CUDA build runs on CPU too.
if [ -z "$gpu" ] && "$venv"/bin/python -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  echo "setup.sh: warning: this machine has no NVIDIA GPU but the index served a CUDA build of torch, whose" \
    "CUDA packages take gigabytes; for a CPU build, add a CPU-only torch index with PIP_EXTRA_INDEX_URL or" \
    "set DRIFT_TORCH_SPEC, then run setup.sh again in a new virtual environment (DRIFT_VENV)" >&2
fi
