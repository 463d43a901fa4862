"""A full-size SD1.5-layout checkpoint with random weights, for tests through the stock loaders.

The host's checkpoint loader (`comfy.sd.load_checkpoint_guess_config`, behind
CheckpointLoaderSimple) only recognises real model sizes, so a server-level test needs a
checkpoint with the real SD1.5 shapes: UNet with model_channels=320, the CLIP-L text
encoder, the SD VAE. No weights can be downloaded, so this module builds one from the
host's own classes, seeded, and caches it (about 2 GB in fp16) under .cache/.

The host's layers (`comfy.ops.disable_weight_init`) leave parameters uninitialised, so
every parameter is set here: norms to 1, biases to 0, matrices and convolutions normal
with std 1/sqrt(fan_in) (activations stay O(1) through the deep UNet and the 12-layer
encoder, so sampling gives finite values and attention is not degenerate), unit-scale
token embeddings and small position embeddings (distinct token contexts).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import comfy.ldm.models.autoencoder
import comfy.sd1_clip
import comfy.supported_models
from fmn_pack.fmn_core import host
from host_models import SD15_UNET

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO / ".cache" / "checkpoints"
CHECKPOINT_NAME = "fmn_random_sd15.safetensors"
# Bump when the construction below changes, so a stale cached file is rebuilt.
BUILDER_VERSION = "1"
SEED = 1234

SD15_FULL_UNET = {**SD15_UNET, "model_channels": 320}
SD_VAE_CONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def init_random(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every parameter of a host module a defined, sane value (see module docstring)."""
    for module_name, sub in module.named_modules():
        for leaf, p in sub.named_parameters(recurse=False):
            name = f"{module_name}.{leaf}"
            if isinstance(sub, NORMS):
                p.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                p.zero_()
            elif "token_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
            elif "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            elif leaf == "logit_scale":  # CLIP's trained value; the checkpoint format drops it
                p.fill_(math.log(100.0))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            else:
                raise ValueError(f"no initialisation rule for parameter {name} {tuple(p.shape)}")


def _unet_and_config(generator: torch.Generator) -> tuple[comfy.supported_models.SD15, torch.nn.Module]:
    config = comfy.supported_models.SD15(dict(SD15_FULL_UNET))
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({})
    init_random(model.diffusion_model, generator)
    return config, model


def _clip_state_dict(generator: torch.Generator) -> dict[str, torch.Tensor]:
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float16)
    init_random(clip, generator)
    return clip.state_dict()


def _vae_state_dict(generator: torch.Generator) -> dict[str, torch.Tensor]:
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_CONFIG), embed_dim=4)
    init_random(vae, generator)
    return {k: v.half() for k, v in vae.state_dict().items()}


def build_state_dict(seed: int = SEED) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, keyed exactly as the host saves an SD1.5 checkpoint."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _, model = _unet_and_config(generator)
        state = host.checkpoint_state_dict(model, _clip_state_dict(generator), _vae_state_dict(generator))
    return {k: v.to(torch.float16).contiguous() for k, v in state.items()}


def _is_current(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fmn_builder_version") == BUILDER_VERSION
    except Exception as e:  # a truncated or foreign file is rebuilt, not trusted
        log.warning("cached checkpoint %s is unreadable (%s): rebuilding", path, e)
        return False


def random_sd15_checkpoint(cache_dir: Path = CACHE_DIR) -> Path:
    """Path of the random full-size SD1.5 checkpoint, built once and reused.

    Written to a temporary name and renamed, so a concurrent or interrupted build never
    leaves a partial file under the final name.
    """
    path = cache_dir / CHECKPOINT_NAME
    if path.is_file() and _is_current(path):
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("building random SD1.5 checkpoint at %s (once; about 2 GB)", path)
    state = build_state_dict()
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file(state, str(partial), metadata={"fmn_builder_version": BUILDER_VERSION, "fmn_seed": str(SEED)})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
