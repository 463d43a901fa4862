"""M-Score: how much of a concept a model still holds, measured by inverting it.

The paper names the score but never writes its formula. This is the project's definition
(docs/mscore.md), exact and reproducible:

1. Invert the concept's anchor images through each model with the same settings: the
   same images, seed, steps, learning rate, prompt template and k rows initialised from
   one neutral word (`init_text`, e.g. "thing"), never the concept's own words
   (`inversion.py`).
2. The recovered representation is the mean, over the k learned positions, of the text
   encoder's output context (what the UNet's cross-attention reads) for the template
   with the learned rows in place; the concept's own representation is the mean over its
   word tokens' positions of the context of the template with the words in place.
3. M-Score = cosine similarity of the two. A model that still knows the concept pulls the
   rows towards the concept's own representation; a model that forgot has silenced that
   direction, so the images must be explained through others: the score drops.
   Drop = score(first model) - score(model).

Why a neutral start: started from the concept's words, a patched model that no longer
attends to them gives those rows almost no gradient, so they stay where they began, next
to the concept, and the score *rises* after forgetting (measured on ToyBench: ring 0.878
-> 0.937 started from "ring", 0.175 -> 0.122 started from "thing").

The optional image-space score samples images from each recovered embedding and compares
the mean CLIP-vision embedding of those images to the anchors' (cosine).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import host
from .inversion import InversionConfig, InversionResult, Prompts, invert
from .text_encoder import TextEncoders
from .tokens import SpecialTokens, concept_positions, content_tokens


@dataclass(frozen=True)
class MScoreRow:
    label: str
    score: float
    drop: float  # score of the first (original) model minus this one
    final_loss: float  # mean inversion loss over the last 10 steps
    image_similarity: float | None = None


def check_same_architecture(models: list[tuple[str, object]]) -> None:
    """M-Score compares inversions of one concept through models of one family only."""
    first_label, first = models[0]
    reference = [(l.module, l.context_dim) for l in host.attn2_layers(first)]
    for label, model in models[1:]:
        if host.model_arch(model) != host.model_arch(first) or [(l.module, l.context_dim) for l in host.attn2_layers(model)] != reference:
            raise ValueError(f"M-Score needs models of one architecture: {label!r} is {host.model_arch(model)}, "
                             f"{first_label!r} is {host.model_arch(first)}. Compare a model with its own patched versions.")


def text_representation(clip, template: str, text: str) -> torch.Tensor:
    """Mean context over the concept's own tokens in `template` filled with its words."""
    special = SpecialTokens(**host.special_tokens(clip))
    prompt = template.format(text)
    positions = concept_positions(host.tokenize(clip, prompt), content_tokens(host.tokenize(clip, text), special), special)
    if not positions:
        raise ValueError(f"concept {text!r} was not found in {prompt!r} after tokenizing")
    return host.encode(clip, prompt)[0, positions].mean(0)


def recovered_representation(encoder: TextEncoders, prompts: Prompts, rows: torch.Tensor) -> torch.Tensor:
    """Mean context over the learned rows' positions in the first template."""
    before, after = prompts.parts[0]
    positions = encoder.chunk(before, rows, after)[1]
    return prompts.encode(encoder, rows, [0])[0][0, positions].mean(0)


def m_scores(models: list[tuple[str, object]], clip, latents: torch.Tensor, concept: str, config: InversionConfig,
             init_text: str, vision=None, vae=None, progress=None) -> list[MScoreRow]:
    """One row per model, in order; the first model is the reference for the drop."""
    if not models:
        raise ValueError("M-Score needs at least one model")
    check_same_architecture(models)
    target = text_representation(clip, config.templates[0], concept)
    results: list[tuple[str, InversionResult]] = [(label, invert(model, clip, latents, init_text, config, progress))
                                                  for label, model in models]
    with torch.inference_mode(False), torch.no_grad():
        encoder = TextEncoders(host.text_encoder_specs(clip))
        prompts = Prompts(clip, config.templates)
        scores = [float(F.cosine_similarity(recovered_representation(encoder, prompts, r.vectors), target.to(r.vectors), dim=0))
                  for _, r in results]
        images = None
        if vision is not None:
            images = [image_similarity(model, encoder, prompts, r.vectors, latents, vision, vae, config.seed)
                      for (_, model), (_, r) in zip(models, results)]
    return [MScoreRow(label, round(score, 6), round(scores[0] - score, 6), round(sum(r.losses[-10:]) / len(r.losses[-10:]), 6),
                      None if images is None else round(images[i], 6))
            for i, ((label, r), score) in enumerate(zip(results, scores))]


def image_similarity(model, encoder: TextEncoders, prompts: Prompts, rows: torch.Tensor, latents: torch.Tensor,
                     vision, vae, seed: int, count: int = 4) -> float:
    """Cosine between the mean CLIP-vision embeddings of images sampled from the recovered
    rows and of the anchor images (decoded from their latents)."""
    if vae is None:
        raise ValueError("the image-space M-Score needs the VAE to decode images: connect it")
    samples = host.sample(model, prompts.encode(encoder, rows, [0]), encoder.empty(), [seed + i for i in range(count)],
                          tuple(latents.shape[1:]))
    generated = host.vision_embeds(vision, host.decode(vae, samples)).mean(0)
    anchors = host.vision_embeds(vision, host.decode(vae, host.process_latent_out(model, latents))).mean(0)
    return float(F.cosine_similarity(generated, anchors, dim=0))


def table(rows: list[MScoreRow], concept: str, config: InversionConfig, init_text: str) -> str:
    """A readable report: one line per model, then the settings that make it reproducible."""
    has_images = any(r.image_similarity is not None for r in rows)
    head = "| model | M-Score | drop | inversion loss |" + (" image sim |" if has_images else "")
    lines = [f"M-Score of {concept!r}", "", head, "|" + "---|" * (4 + has_images)]
    for r in rows:
        extra = f" {r.image_similarity:.4f} |" if has_images else ""
        lines.append(f"| {r.label} | {r.score:.4f} | {r.drop:+.4f} | {r.final_loss:.4f} |{extra}")
    lines += ["", f"settings: template {config.templates[0]!r}, {config.num_tokens} tokens from {init_text!r}, "
              f"{config.steps} steps, lr {config.learning_rate}, seed {config.seed}, batch {config.batch_size}"]
    return "\n".join(lines)
