"""What the Comfy Registry and ComfyUI-Manager check before they list or install a pack."""
from __future__ import annotations

import ast
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from conftest import HOST  # the ComfyUI tree the tests run against (FMN_COMFYUI)

REPO = Path(__file__).resolve().parents[1]
RUNTIME = ["__init__.py", "nodes", "fmn_core", "toybench"]  # what ComfyUI imports when it loads the pack
SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
RAW_GITHUB = re.compile(r"^https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.+)$")


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def tracked_python() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / line for line in out.splitlines()]


def requirement_names(path: Path) -> set[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower() for line in lines if line}


def test_project_metadata_passes_the_registry_checks(project: dict) -> None:
    meta, comfy = project["project"], project["tool"]["comfy"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]{1,99}", meta["name"]), meta["name"]
    assert SEMVER.match(meta["version"]), meta["version"]
    assert meta["license"] == {"file": "LICENSE"}
    assert "GNU GENERAL PUBLIC LICENSE" in (REPO / "LICENSE").read_text() and "Version 3" in (REPO / "LICENSE").read_text()
    assert meta["description"].strip()
    assert meta["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    icon = RAW_GITHUB.match(comfy["Icon"])
    assert icon and (REPO / icon.group(1)).is_file(), f"Icon {comfy['Icon']} does not point at a file of this repository"
    assert (REPO / icon.group(1)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_requirements_ask_for_nothing_the_host_installs(project: dict) -> None:
    ours = requirement_names(REPO / "requirements.txt") | {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower()
                                                        for d in project["project"]["dependencies"]}
    host = requirement_names(HOST / "requirements.txt")
    assert "torch" in host, f"the host's requirements.txt was not found in {HOST}"
    assert not ours & host, f"the pack would re-pin host packages: {sorted(ours & host)}"
    assert not {name for name in ours if name.startswith("torch")}


def test_the_host_under_test_is_in_the_declared_range(project: dict) -> None:
    """`requires-comfyui` (what ComfyUI-Manager and the registry check) admits every host
    the suite runs on, and its floor is the oldest one set-up builds (FMN_HOST=floor)."""
    from packaging.specifiers import SpecifierSet

    declared = SpecifierSet(project["tool"]["comfy"]["requires-comfyui"])
    version = re.search(r'__version__\s*=\s*"([^"]+)"', (HOST / "comfyui_version.py").read_text()).group(1)
    assert version in declared, f"ComfyUI {version} at {HOST} is outside requires-comfyui {declared}"
    floor = re.search(r"floor\)\s+version=([\d.]+);", (REPO / "scripts" / "setup_host.sh").read_text()).group(1)
    assert {s.operator for s in declared} == {">="} and [s.version for s in declared] == [floor], declared


def test_no_eval_exec_or_runtime_installs() -> None:
    found = []
    for path in tracked_python():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.func.id}()")
    runtime = [p for p in tracked_python() if p.relative_to(REPO).parts[0] in RUNTIME]
    assert runtime, "no runtime sources found"
    for path in runtime:
        text = path.read_text()
        if re.search(r"pip\b.*\binstall|\bsubprocess\b|\bos\.system\b", text):
            found.append(f"{path.relative_to(REPO)}: runs a process or installs packages")
    assert not found, found
