"""Load the shipped ToyBench weights into host objects: MODEL (ModelPatcher), CLIP, VAE.

Every weights file is checked against the sha256 in weights/manifest.json; a missing or
altered file stops with an error naming the file and the command that rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

WEIGHTS = Path(__file__).resolve().parent / "weights"
REBUILD = ".venv/bin/python -m toybench.train   (from the Forget-Me-Not repo root)"
MODEL_FILES = ("unet.safetensors", "clip.safetensors", "vae.safetensors")


class ToyBenchWeightsError(RuntimeError):
    pass


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(folder: Path | str = WEIGHTS) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise ToyBenchWeightsError(f"ToyBench manifest missing: {path}. Rebuild the weights with: {REBUILD}")
    return json.loads(path.read_text())


def checked_file(name: str, folder: Path | str = WEIGHTS) -> Path:
    """Path of weights file `name` after checking it against the manifest."""
    folder = Path(folder)
    expected = manifest(folder)["files"].get(name)
    path = folder / name
    if expected is None:
        raise ToyBenchWeightsError(f"ToyBench weights file {path} is not listed in {folder / 'manifest.json'}. "
                                   f"Rebuild the weights with: {REBUILD}")
    if not path.is_file():
        raise ToyBenchWeightsError(f"ToyBench weights file missing: {path}. Rebuild the weights with: {REBUILD}")
    if sha256(path) != expected:
        raise ToyBenchWeightsError(f"ToyBench weights file altered (sha256 does not match the manifest): {path}. "
                                   f"Rebuild the weights with: {REBUILD}")
    return path


def _read(name: str, folder) -> dict:
    from safetensors.torch import load_file
    return load_file(str(checked_file(name, folder)))


def load(folder: Path | str = WEIGHTS, embedding_directory=None):
    """(MODEL, CLIP, VAE) built from the host's classes around the shipped weights;
    `embedding:NAME` in prompts is looked up in `embedding_directory` (a path or list)."""
    from . import model as M
    unet_sd, clip_sd, vae_sd = (_read(n, folder) for n in MODEL_FILES)
    mp = M.unet()
    net = mp.model.diffusion_model
    missing, unexpected = net.load_state_dict({k: v.float() for k, v in unet_sd.items()}, strict=False)
    if missing or unexpected:
        raise ToyBenchWeightsError(f"unet.safetensors does not match the toy UNet layout (missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}). Rebuild the weights with: {REBUILD}")
    net.eval()
    clip = M.clip(embedding_directory=embedding_directory)
    M.load_clip_state(clip, clip_sd)
    vae = M.vae({k: v.float() for k, v in vae_sd.items()})
    return mp, clip, vae


def load_oracle(folder: Path | str = WEIGHTS):
    from . import oracle
    return oracle.load(_read("oracle.safetensors", folder))
