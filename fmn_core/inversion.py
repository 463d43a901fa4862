"""Concept Inversion: textual inversion of a concept's images into k new token rows.

The UNet is frozen; only the k rows train, so the MODEL reproduces the images when the
rows stand in a prompt ("a photo of <rows>"). Noise-prediction loss, AdamW, seeded. The
rows start from the concept's own words (METHOD.md): with k different from the number of
word tokens, the words' rows are cycled (k larger) or averaged in k groups (k smaller),
so an inversion through a model that still knows the concept starts where it should end.
The result is saved in the host's embedding format and used as `embedding:NAME`.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import host
from .checkpoint import Checkpoints, capture, resumed, save_state, settings_of, starting_state, state_path
from .embedding import Embedding, describe, save_embedding
from .latents import noisy
from .memory import Precision, check_precision, checkpointed
from .text_encoder import TextEncoders
from .tokens import SpecialTokens, content_tokens

DEFAULT_TEMPLATE = "a photo of {}"


@dataclass(frozen=True)
class InversionConfig:
    num_tokens: int = 4
    steps: int = 200
    learning_rate: float = 5e-3
    seed: int = 0
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    batch_size: int = 4
    precision: str = "fp32"  # memory.py: autocast "fp32" (none), "bf16", "fp16"
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {self.num_tokens}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        check_precision(self.precision)
        bad = [t for t in self.templates if t.count("{}") != 1]
        if not self.templates or bad:
            raise ValueError(f"each prompt template needs exactly one {{}} where the learned tokens go, got {bad or 'none'}")


@dataclass
class InversionResult:
    vectors: torch.Tensor  # (k, width): the learned rows
    initial: torch.Tensor  # (k, width): where they started
    layout: tuple[tuple[str, int], ...]  # (the host's key, width) per encoder: ("clip_l", 768), ...
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def word_rows(encoder: TextEncoders, clip, text: str) -> torch.Tensor:
    """Input rows (n, width) of a text's tokens; `embedding:NAME` entries give their vectors."""
    special = SpecialTokens(**host.special_tokens(clip))
    tokens = content_tokens(host.tokenize(clip, text), special)
    if not tokens:
        raise ValueError(f"init_text {text!r} tokenizes to nothing: give the concept's words (e.g. 'Captain Zorb')")
    rows = [t.reshape(-1, encoder.width).to(encoder.table) if isinstance(t, torch.Tensor) else encoder.token_rows([t])
            for t in tokens]
    return torch.cat(rows)


def initial_rows(words: torch.Tensor, k: int) -> torch.Tensor:
    """k rows from the words' rows: cycled when k >= n, else averaged over k even groups."""
    n = words.shape[0]
    if k >= n:
        return words[torch.arange(k) % n].clone()
    return torch.stack([g.mean(0) for g in torch.tensor_split(words, k)])


class Prompts:
    """Each template split around its `{}` into token ids, for `TextEncoders.chunk`."""

    def __init__(self, clip, templates: tuple[str, ...]):
        special = SpecialTokens(**host.special_tokens(clip))

        def ids(text: str) -> list[int]:
            tokens = content_tokens(host.tokenize(clip, text), special) if text.strip() else []
            if any(isinstance(t, torch.Tensor) for t in tokens):
                raise ValueError(f"prompt template {text!r} may not contain embedding: names")
            return [int(t) for t in tokens]

        self.parts = [(ids(t.split("{}")[0]), ids(t.split("{}")[1])) for t in templates]

    def encode(self, encoder: TextEncoders, rows: torch.Tensor, picks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) of the templates `picks` with `rows` in their `{}`."""
        chunks, ends = [], []
        for i in picks:
            before, after = self.parts[i]
            chunks.append(encoder.chunk(before, rows, after)[0])
            ends.append(1 + len(before) + len(rows) + len(after))
        return encoder.encode(torch.stack(chunks), ends)


def invert(patcher, clip, latents: torch.Tensor, init_text: str, config: InversionConfig, progress=None,
           checkpoints: Checkpoints | None = None, resume: Path | None = None) -> InversionResult:
    """Learn `config.num_tokens` rows so that `patcher` denoises `latents` (model space,
    (N, C, H, W)) under the templates with the rows in place; the model and CLIP are untouched.

    `checkpoints` writes the embedding so far and its training state every N steps;
    `resume` (a state file) continues such a run, with the same settings, to `config.steps`."""
    config.validate()
    if latents is None or len(latents) == 0:
        raise ValueError("Concept Inversion needs the concept's images (with a VAE) or a latent batch")
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    settings = settings_of(config, init_text=init_text,
                           base_fingerprint=host.model_fingerprint(patcher, host.attn2_layers(patcher)))
    state = starting_state(resume, checkpoints, settings, config.steps)
    device = host.device()
    sampling = host.model_sampling(patcher)
    with torch.inference_mode(False):
        encoder = TextEncoders(host.text_encoder_specs(clip))
        prompts = Prompts(clip, config.templates)
        initial = initial_rows(word_rows(encoder, clip, init_text), config.num_tokens).detach()
        rows = torch.nn.Parameter(initial.clone())
        optimizer = torch.optim.AdamW([rows], lr=config.learning_rate, weight_decay=0.0)
        latents = latents.float().detach().clone()
        start, losses = resumed(state, [rows], optimizer, generator, progress)
        precision = Precision(config.precision, device)
        clone = patcher.clone()
        blocks = host.unet_blocks(clone) if config.gradient_checkpointing else []
        with host.trainable_unet(clone, {}) as unet, checkpointed(blocks, contextlib.nullcontext):
            for step in range(start, config.steps):
                with precision.autocast():
                    loss = _step_loss(unet, encoder, prompts, rows, latents, sampling, generator, config, step, device)
                optimizer.zero_grad(set_to_none=True)
                precision.backward(loss)
                precision.step(optimizer)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"Concept Inversion diverged at step {step + 1}: lower learning_rate")
                losses.append(float(loss.detach()))
                if checkpoints is not None and checkpoints.due(step + 1, config.steps):
                    path = checkpoints.path_for(step + 1)
                    metadata = describe(init_text, replace(config, steps=step + 1), losses)
                    save_embedding(Embedding(path.stem, rows.detach().clone(), encoder.layout, metadata), path)
                    save_state(state_path(path), capture(step + 1, [rows], optimizer, generator, losses), settings)
                if progress is not None:
                    progress.step()
        vectors = rows.detach().clone()
    return InversionResult(vectors, initial, encoder.layout, losses, time.perf_counter() - started)


def _step_loss(unet, encoder: TextEncoders, prompts: Prompts, rows: torch.Tensor, latents: torch.Tensor, sampling,
               generator: torch.Generator, config: InversionConfig, step: int, device: torch.device) -> torch.Tensor:
    """Noise-prediction MSE on a batch of the images, templates taken in turn."""
    picks = torch.randint(len(latents), (config.batch_size,), generator=generator)
    x, sigma, noise = noisy(sampling, latents[picks], generator)
    templates = [(step * config.batch_size + b) % len(prompts.parts) for b in range(config.batch_size)]
    context, pooled = prompts.encode(encoder, rows, templates)
    denoised = unet(x.to(device), sigma.to(device), context.to(device), pooled.to(device))
    eps = (x.to(device) - denoised) / sigma.to(device).reshape(-1, 1, 1, 1)
    return (eps - noise.to(device)).pow(2).mean()
