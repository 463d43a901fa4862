"""Sampling as the stock nodes do it: conditioning, KSampler's sampler, the VAE, preview
images and CLIP-vision embeddings."""
from __future__ import annotations

import torch

from .text import checked_tokens


def vae_encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Latents of `images`, as constants. Outside the host's inference mode (a script or
    library caller) the VAE's forward would otherwise hand training a graph that every step
    backs through again ("Trying to backward through the graph a second time")."""
    with torch.no_grad():
        return vae.encode(images[:, :, :, :3])


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents -> images (B, H, W, 3)."""
    return vae.decode(latents)


def conditioning(clip, text: str) -> list:
    """CONDITIONING of a prompt, as CLIPTextEncode builds it."""
    cond, pooled = clip.encode_from_tokens(checked_tokens(clip, text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def sample_latent(patcher, positive: list, negative: list, noise_seeds: list[int], latent: torch.Tensor,
                  steps: int = 20, cfg: float = 5.0, sampler_name: str = "euler", scheduler: str = "normal") -> torch.Tensor:
    """KSampler's sampling, one noise seed per batch row (one seed: KSampler's own batch noise)."""
    import comfy.sample

    if len(noise_seeds) == 1:
        noise = comfy.sample.prepare_noise(latent, noise_seeds[0])
    else:
        noise = torch.cat([comfy.sample.prepare_noise(latent[:1], s) for s in noise_seeds])
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                               disable_pbar=True, seed=noise_seeds[0])


def sample(patcher, positive: tuple[torch.Tensor, torch.Tensor | None], negative: tuple[torch.Tensor, torch.Tensor | None],
           seeds: list[int], shape: tuple[int, ...], steps: int = 20, cfg: float = 5.0) -> torch.Tensor:
    """VAE latents sampled as KSampler does (euler, normal), one per seed, from raw
    (context (1, T, D), pooled (1, W) or None) pairs instead of text: conditioning no
    prompt can spell. A positive of one row per seed, (N, T, D), samples N prompts in one call."""
    n = len(seeds)

    def cond(context: torch.Tensor, pooled: torch.Tensor | None) -> list:
        extra = {} if pooled is None else {"pooled_output": pooled.detach().expand(n, -1).cpu()}
        return [[context.detach().expand(n, -1, -1).cpu(), extra]]

    return sample_latent(patcher, cond(*positive), cond(*negative), seeds, torch.zeros((n, *shape)), steps, cfg)


def sampler_names() -> tuple[list[str], list[str]]:
    """The host's sampler and scheduler names (KSampler's combos)."""
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)


def preview_images(images: torch.Tensor, prefix: str) -> list[dict]:
    """Save images as the stock Preview Image node does (temp folder, PNG); the UI's file refs."""
    import nodes

    return nodes.PreviewImage().save_images(images, filename_prefix=prefix)["ui"]["images"]


def vision_embeds(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """CLIP-vision image embeddings (B, D) of images (B, H, W, 3), as CLIPVisionEncode computes them."""
    return clip_vision.encode_image(images).image_embeds.float()
