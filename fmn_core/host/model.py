"""What a host model is: its cross-attention layers and their names, its family and
fingerprint, its weight shapes, its device, its sampling schedule and latent space."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch

ATTN2_NAME = re.compile(
    r"^diffusion_model\.(input_blocks|middle_block|output_blocks)\.(?:(\d+)\.)?\d+\.transformer_blocks\.(\d+)\.attn2$"
)
VAE_FACTOR = 8  # pixels per latent cell in the SD1.x / SD2.x / SDXL latent spaces
BLOCK_NAMES = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


@dataclass(frozen=True)
class Attn2Layer:
    """One UNet cross-attention layer, named the way the host names it."""

    module: str  # e.g. "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2"
    block: tuple[str, int, int]  # attn2 replace key: (block name, block id, transformer index)
    heads: int
    dim_head: int
    context_dim: int

    def weight_key(self, projection: str) -> str:
        return f"{self.module}.{projection}.weight"


def attn2_layers(patcher) -> list[Attn2Layer]:
    """Find every cross-attention layer of a host UNet, in execution order."""
    layers = []
    for name, module in patcher.model.named_modules():
        match = ATTN2_NAME.match(name)
        if match is None:
            continue
        kind, block_id, index = match.groups()
        number = 0 if kind == "middle_block" else int(block_id)
        block = (BLOCK_NAMES[kind], number, int(index))
        heads = module.heads
        layers.append(Attn2Layer(name, block, heads, module.to_k.out_features // heads, module.to_k.in_features))
    if not layers:
        raise ValueError(
            f"no UNet cross-attention layers found in model type {model_arch(patcher)}: "
            "Forget-Me-Not supports the SD1.x, SD2.x and SDXL UNet families (DiT models such as SD3, Flux or PixArt "
            "have no such layers)"
        )
    return layers


def model_arch(patcher) -> str:
    """The host's name for the model family (its supported_models config class)."""
    return type(patcher.model.model_config).__name__


def model_fingerprint(patcher, layers: list[Attn2Layer]) -> str:
    """A short hash of the base weights the patch was trained on (first layer's to_k).

    Informational: patches transfer across fine-tunes of one architecture, so this is
    recorded, not enforced.
    """
    weight = patcher.get_model_object(layers[0].weight_key("to_k"))
    data = weight.detach().to("cpu", torch.float16).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def weight_shapes(patcher, keys: list[str]) -> dict[str, tuple[int, ...]]:
    state = patcher.model.state_dict()
    return {k: tuple(state[k].shape) for k in keys if k in state}


def device() -> torch.device:
    import comfy.model_management as mm

    return mm.get_torch_device()


def model_sampling(patcher):
    return patcher.get_model_object("model_sampling")


def process_latent_in(patcher, latent: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the model's input space (the sampler does the same)."""
    return patcher.model.process_latent_in(latent)


def process_latent_out(patcher, latent: torch.Tensor) -> torch.Tensor:
    """The model's input space -> VAE latents."""
    return patcher.model.process_latent_out(latent)


def percent_to_sigma(patcher, percent: float) -> float:
    return float(model_sampling(patcher).percent_to_sigma(percent))
