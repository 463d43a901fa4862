"""Recovery attack: can textual inversion through the patched model bring a forgotten
concept back?

The attacker holds the patched model and pictures of the concept. They invert the
pictures into new tokens through the patched model (Concept Inversion, started from a
neutral word so nothing of the concept's own words helps them), then sample the template
with those tokens. The attack succeeds as often as those samples show the concept.

The judge is a diffusion classifier (Li et al. 2023, "Your Diffusion Model is Secretly a
Zero-Shot Classifier") run on the original model: a sample shows the concept when the
original model denoises it better under the concept's prompt than under the anchor's
(the same prompt with the concept replaced), over fixed noise draws and timesteps. It
needs no detector from outside, works for any model the pack supports, and on ToyBench
it agrees with the oracle (`tests/test_toybench.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import host
from .inversion import InversionConfig, Prompts, invert
from .text_encoder import TextEncoders

JUDGE_TIMESTEPS = (200, 400, 600, 800)
JUDGE_NOISE_DRAWS = 2


@dataclass(frozen=True)
class AttackResult:
    rate: float  # share of the recovered tokens' samples the judge says show the concept
    prompt_rate: float  # the same for the concept's own prompt through the patched model
    original_rate: float  # the same for the concept's own prompt through the original model
    samples: torch.Tensor  # VAE latents sampled from the recovered tokens
    rows: torch.Tensor  # the recovered token rows (k, width)
    final_loss: float


@torch.no_grad()
def denoising_errors(patcher, latents: torch.Tensor, positive: tuple[torch.Tensor, torch.Tensor | None],
                     seed: int) -> torch.Tensor:
    """Mean noise-prediction error (N,) of model-space `latents` under one prompt's
    (context, pooled), over JUDGE_TIMESTEPS x JUDGE_NOISE_DRAWS fixed noisings."""
    forward = host.loaded_forward(patcher)
    sampling = host.model_sampling(patcher)
    device = host.device()
    context, pooled = positive
    n = len(latents)
    generator = torch.Generator().manual_seed(seed)
    errors = torch.zeros(n)
    for _ in range(JUDGE_NOISE_DRAWS):
        noise = torch.randn(latents.shape, generator=generator)
        for t in JUDGE_TIMESTEPS:
            sigma = sampling.sigma(torch.full((n,), float(t))).cpu()
            x = sampling.noise_scaling(sigma.reshape(-1, 1, 1, 1), noise, latents)
            denoised = forward(x.to(device), sigma.to(device), context.expand(n, -1, -1).to(device),
                               None if pooled is None else pooled.expand(n, -1))
            eps = (x.to(device) - denoised) / sigma.to(device).reshape(-1, 1, 1, 1)
            errors += (eps.cpu().float() - noise).pow(2).flatten(1).mean(1)
    return errors / (JUDGE_NOISE_DRAWS * len(JUDGE_TIMESTEPS))


def judge(original, latents: torch.Tensor, concept: tuple[torch.Tensor, torch.Tensor | None],
          anchor: tuple[torch.Tensor, torch.Tensor | None], seed: int) -> torch.Tensor:
    """Per latent (model space): does the original model denoise it better under the
    concept's (context, pooled) than under the anchor's? (bool (N,))"""
    return denoising_errors(original, latents, concept, seed) < denoising_errors(original, latents, anchor, seed)


def shows_concept(original, clip, latents: torch.Tensor, prompt: str, anchor_prompt: str, seed: int = 0) -> torch.Tensor:
    """`judge` with the two prompts as text."""
    return judge(original, latents, host.encode_pooled(clip, prompt), host.encode_pooled(clip, anchor_prompt), seed)


def attack(original, patched, clip, latents: torch.Tensor, concept: str, anchor: str, config: InversionConfig,
           init_text: str, seeds: list[int], progress=None, patched_clip=None) -> AttackResult:
    """Invert `latents` (the concept's images, model space) through `patched` from
    `init_text`, sample `config.templates[0]` with the recovered rows on `seeds`, and judge
    those samples, and samples of the concept's own prompt through both models.

    `patched_clip` is the text encoder the patched pipeline uses, where the patch edited it
    (a 'token rows' patch): the attacker inverts and prompts through it, while the judge
    and the original model read the original `clip`."""
    attacked_clip = clip if patched_clip is None else patched_clip
    template = config.templates[0]
    prompt, anchor_prompt = template.format(concept), " ".join(template.format(anchor).split())
    if prompt == anchor_prompt:
        raise ValueError(f"the anchor {anchor!r} gives the concept's own prompt: name a different anchor")
    inversion = invert(patched, attacked_clip, latents, init_text, config, progress)
    shape = tuple(latents.shape[1:])
    with torch.inference_mode(False), torch.no_grad():
        encoders = TextEncoders(host.text_encoder_specs(attacked_clip))
        recovered = Prompts(attacked_clip, (template,)).encode(encoders, inversion.vectors, [0])
        empty = encoders.empty()
    concept_cond, anchor_cond = host.encode_pooled(clip, prompt), host.encode_pooled(clip, anchor_prompt)
    samples = host.sample(patched, recovered, empty, seeds, shape)
    patched_cond = concept_cond if patched_clip is None else host.encode_pooled(patched_clip, prompt)
    plain = {"patched": host.sample(patched, patched_cond, empty, seeds, shape),
             "original": host.sample(original, concept_cond, empty, seeds, shape)}

    def rate(found: torch.Tensor) -> float:
        judged = judge(original, host.process_latent_in(original, found), concept_cond, anchor_cond, config.seed)
        return float(judged.float().mean())

    return AttackResult(rate(samples), rate(plain["patched"]), rate(plain["original"]), samples, inversion.vectors,
                        sum(inversion.losses[-10:]) / len(inversion.losses[-10:]))
