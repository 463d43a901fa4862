"""Latents for training: the node's image/latent inputs in the model's space, and noising."""
from __future__ import annotations

import torch

from . import host
from .concepts import Concept


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


class LatentSource:
    """Training latents per concept: encoded images when given, else pure noise."""

    def __init__(self, per_concept: dict[int, torch.Tensor], noise_shape: tuple[int, ...]):
        self.per_concept = per_concept
        self.noise_shape = noise_shape

    def draw(self, concept: int, generator: torch.Generator) -> torch.Tensor:
        latents = self.per_concept.get(concept)
        if latents is None:
            return torch.randn(self.noise_shape, generator=generator)
        i = int(torch.randint(len(latents), (1,), generator=generator))
        return latents[i]


def latents_for_concepts(patcher, concepts: list[Concept], images=None, vae=None, latent=None) -> dict[int, torch.Tensor]:
    """Training latents per concept, in the model's input space: a concept line's
    `images=A-B` picks its rows, otherwise every concept uses all of them."""
    samples = input_latents(patcher, images, vae, latent)
    if samples is None:
        return {}
    per_concept = {}
    for index, concept in enumerate(concepts):
        if concept.images is None:
            per_concept[index] = samples
            continue
        start, end = concept.images
        if end >= len(samples):
            raise ValueError(f"concept {concept.text!r} asks for images {start}-{end} but only {len(samples)} were given (0-{len(samples) - 1})")
        per_concept[index] = samples[start:end + 1]
    return per_concept
