"""Attention measurements: how much of the model's cross-attention each token receives."""
from __future__ import annotations

import torch

from . import host
from .attention import TokenShare, make_attn2_replace


@torch.no_grad()
def token_shares(patcher, context: torch.Tensor, seeds: list[int], timesteps: list[int], resolution: int = 512,
                 pooled: torch.Tensor | None = None) -> torch.Tensor:
    """Mean share of cross-attention per context token (T,), over seeds x timesteps
    (`pooled`: the prompt's pooled embedding, for models that take one, e.g. SDXL).

    Each (seed, timestep) is one noisy pure-noise latent; shares are averaged over pixels,
    heads and every cross-attention layer, so they sum to 1.
    """
    sink = TokenShare()
    clone = patcher.clone()
    host.register_attn2(clone, host.attn2_layers(patcher), lambda layer, prev: make_attn2_replace(layer.module, sink, prev))
    forward = host.loaded_forward(clone)
    sampling = host.model_sampling(patcher)
    channels = patcher.model.diffusion_model.in_channels
    size = resolution // 8
    device = host.device()
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        latent = torch.randn((1, channels, size, size), generator=g)
        noise = torch.randn(latent.shape, generator=g)
        for t in timesteps:
            sigma = sampling.sigma(torch.tensor([float(t)])).cpu()
            x = sampling.noise_scaling(sigma, noise, latent)
            forward(x.to(device), sigma.to(device), context.to(device), pooled)
    return sink.shares()[0]
