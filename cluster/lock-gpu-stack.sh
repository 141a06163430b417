#!/usr/bin/env bash
# Writes cluster/gpu-constraints.txt, the package versions every GPU node installs drift-ray[vllm] under:
# the newest vLLM whose torch is a CUDA 12.8 build (vLLM 0.19.1, torch 2.10.0: NVIDIA driver 570 or newer,
# what the clusters' images carry; later vLLM releases need CUDA 13, driver 580), with every other package
# as it stood when that vLLM was released, since vLLM declares few upper bounds and later releases of its
# dependencies may break it. Two exceptions, with the packages they need of their own time: Ray, the version of
# the clusters' image; DeepSpeed, which vLLM does not use, the newest (DeepSpeed 0.18.9 of vLLM's time fails
# ZeRO-2's all-gather under a later torch, which drift-ray's tests run on; 0.19.8 passes them with this lock's
# transformers, PEFT and datasets). Python 3.11 on x86-64 Linux, as the image. Needs uv (pip install uv).
#
#   bash cluster/lock-gpu-stack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
vllm=0.19.1
released=2026-04-19  # the day after vLLM $vllm
ray=$(sed -n 's/^ *image: rayproject\/ray:\([0-9.]*\)-py311-gpu$/\1/p' cluster/aws.yaml)
[ -n "$ray" ] || { echo "lock-gpu-stack.sh: no rayproject/ray:VERSION-py311-gpu image in cluster/aws.yaml" >&2; exit 2; }
today=$(date -u +%F)
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
printf 'vllm==%s\nray==%s\n' "$vllm" "$ray" > "$pins"
uv pip compile pyproject.toml --extra vllm --constraint "$pins" --python-version 3.11 \
  --python-platform x86_64-manylinux_2_31 --exclude-newer "$released" \
  --exclude-newer-package "ray=$today" --exclude-newer-package "aiohttp=$today" --exclude-newer-package "yarl=$today" \
  --exclude-newer-package "deepspeed=$today" \
  --upgrade --no-annotate --custom-compile-command "bash cluster/lock-gpu-stack.sh" --quiet --output-file cluster/gpu-constraints.txt
echo "wrote cluster/gpu-constraints.txt: vllm $vllm, ray $ray, $(grep -c '==' cluster/gpu-constraints.txt) packages"
