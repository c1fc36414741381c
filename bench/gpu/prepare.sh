#!/usr/bin/env bash
# Run HERE, before a session's device run: stage in .dev/gpu (ignored by git) what the device machine lacks, so that
# its one short run measures instead of setting up. The device image has python3.12 with torch, safetensors, einops,
# numpy, transformers, aiohttp, pytest & co. (see the device tool's KINDS.md) but no network, no ComfyUI and not
# ComfyUI's torchsde / av; those travel as a copy of the provisioned 0.9.2 engine and py3.12 wheels (≈ 60 MiB of
# the 64 MiB a device call may carry).
#
#   bash bench/gpu/prepare.sh
#   then the device tool: run(command="bash bench/gpu/run.sh", carry=[".dev/gpu"], timeout_s=590)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-$HOME/.cache/lora-composer/venv/bin/python}
engine=$("$PY" scripts/provision_comfyui.py)
rm -rf .dev/gpu
mkdir -p .dev/gpu/wheels
cp -r "$engine" .dev/gpu/comfyui
find .dev/gpu/comfyui -name __pycache__ -prune -exec rm -rf {} +
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .dev/gpu/wheels torchsde trampoline av 2>&1 | grep -v "^WARNING: Location" || true
ls .dev/gpu/wheels
# du counts .dev/gpu once, on the first line; the second is the rest of the working tree
du -sm .dev/gpu . --exclude=.git | awk 'NR==1{g=$1} NR==2{t=$1} END{print g" MiB staged, "g+t" MiB with the working tree (a device call carries at most 64 MiB)"}'
echo 'next: run(command="bash bench/gpu/run.sh", carry=[".dev/gpu"], timeout_s=590), then give_back'
