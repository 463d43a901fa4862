"""Latents for training: the node's image/latent inputs in the model's space, and noising."""
from __future__ import annotations

import torch

from . import host


def input_latents(patcher, images=None, vae=None, latent=None) -> torch.Tensor | None:
    """Images (B, H, W, C) VAE-encoded, or a LATENT dict's samples, in the model's input
    space (as the sampler sees them); None when neither is connected."""
    if images is not None and latent is not None:
        raise ValueError("connect either images (with a VAE) or a latent, not both")
    if images is not None:
        if vae is None:
            raise ValueError("images are connected but no VAE: connect the model's VAE so the images can be encoded")
        samples = host.vae_encode(vae, images)
    elif latent is not None:
        samples = latent["samples"]
    else:
        return None
    return host.process_latent_in(patcher, samples.float().cpu())


def noisy(sampling, latent: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latent, sigma, noise) at one uniform timestep per sample, as the model is trained."""
    noise = torch.randn(latent.shape, generator=generator)
    t = torch.randint(0, 1000, (latent.shape[0],), generator=generator)
    sigma = sampling.sigma(t.float()).cpu()
    return sampling.noise_scaling(sigma, noise, latent), sigma, noise
