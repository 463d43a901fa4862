"""Test bootstrap: put the real ComfyUI tree (installed by `make test`) on the path,
force CPU, and import the pack the way ComfyUI does (as a package from its folder)."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOST = Path(os.environ.get("FMN_COMFYUI", REPO / ".host" / "ComfyUI"))

if not (HOST / "comfy").is_dir():
    raise RuntimeError(f"ComfyUI tree not found at {HOST}: run `make test` (it installs it) or set FMN_COMFYUI")

sys.path.insert(0, str(HOST))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "2")

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True

import comfy.model_management  # noqa: E402,F401

PACK_NAME = "fmn_pack"


def _import_pack():
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


pack = _import_pack()


@pytest.fixture(scope="session")
def fmn():
    """The pack imported as ComfyUI imports it."""
    return pack


@pytest.fixture
def embeddings_folder(tmp_path):
    """The host's embeddings folder pointed at an empty temporary one for one test."""
    import folder_paths
    saved = folder_paths.folder_names_and_paths["embeddings"]
    folder_paths.folder_names_and_paths["embeddings"] = ([str(tmp_path)], saved[1])
    yield tmp_path
    folder_paths.folder_names_and_paths["embeddings"] = saved
