"""Attention Map Viewer: sample a prompt with the heatmap capture on, for one model or a
before/after pair with the same seed and noise, and turn the maps into masks and overlays."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import host
from .attention import make_attn2_replace
from .heatmaps import (HeatmapSink, Word, block_filter, content_words, locate_words, normalize, overlays,
                       prompt_words)
from .tokens import SpecialTokens


@dataclass(frozen=True)
class MapSettings:
    seed: int = 0
    steps: int = 20
    cfg: float = 7.0
    sampler_name: str = "euler"
    scheduler: str = "normal"
    width: int = 512
    height: int = 512
    negative: str = ""
    start_percent: float = 0.0  # the part of the sampling run whose attention is kept
    end_percent: float = 1.0
    blocks: str = "all"
    resolution: str = "all"
    normalization: str = "per word"
    colormap: str = "jet"
    alpha: float = 0.6

    def validate(self) -> None:
        if self.width % 8 or self.height % 8 or self.width < 8 or self.height < 8:
            raise ValueError(f"width and height must be positive multiples of 8, got {self.width}x{self.height}")
        if not 0 <= self.start_percent < self.end_percent <= 1:
            raise ValueError(f"need 0 <= start_percent < end_percent <= 1, got {self.start_percent}, {self.end_percent}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        block_filter(self.blocks, self.resolution)


@dataclass
class MapResult:
    images: torch.Tensor  # (models, H, W, 3)
    overlays: torch.Tensor  # (models * words, H, W, 3): model-major
    masks: torch.Tensor  # (models * words, h, w) normalised, latent resolution
    words: list[str]
    labels: list[str]  # model label per image ("before", "after")
    capture_bytes: int  # the accumulator's size: what memory the capture holds


def find_words(clip, prompt: str, words_text: str) -> list[Word]:
    """The words to map: the comma-separated list, or every content word of the prompt."""
    special = SpecialTokens(**host.special_tokens(clip))
    chunks = host.tokenize(clip, prompt)
    explicit = [w.strip() for w in words_text.split(",") if w.strip()]
    tokenize = lambda text: host.tokenize(clip, text)  # noqa: E731
    try:
        found = locate_words(chunks, explicit or content_words(prompt), tokenize, special, bool(explicit))
    except ValueError as e:
        raise ValueError(f"{e}: the prompt's words are {', '.join(prompt_words(prompt))}") from None
    if not found:
        raise ValueError(f"none of the prompt's words could be located: {', '.join(prompt_words(prompt))}")
    return found


def capture(model, positive: list, negative: list, words: list[Word], settings: MapSettings) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(latent, word maps (words, h, w), accumulator bytes) of one sampling run with the capture on."""
    positions = sorted({p for w in words for p in w.positions})
    latent_hw = (settings.height // 8, settings.width // 8)
    sigmas = (host.percent_to_sigma(model, settings.start_percent), host.percent_to_sigma(model, settings.end_percent))
    sink = HeatmapSink(positions, latent_hw, settings.blocks, settings.resolution, sigmas)
    clone = model.clone()
    host.register_attn2(clone, host.attn2_layers(model), lambda layer, previous: make_attn2_replace(layer.module, sink, previous))
    channels = model.model.diffusion_model.in_channels
    latent = torch.zeros((1, channels, *latent_hw))
    samples = host.sample_latent(clone, positive, negative, [settings.seed], latent, settings.steps, settings.cfg,
                                 settings.sampler_name, settings.scheduler)
    maps = sink.word_maps(words, {p: i for i, p in enumerate(positions)})
    return samples, maps.cpu(), sink.nbytes()


def attention_maps(model, clip, vae, prompt: str, words_text: str, settings: MapSettings, model_after=None) -> MapResult:
    """Sample `prompt` with each model (same seed and noise) and map each word's attention."""
    settings.validate()
    words = find_words(clip, prompt, words_text)
    positive, negative = host.conditioning(clip, prompt), host.conditioning(clip, settings.negative)
    models = [("before", model)] + ([("after", model_after)] if model_after is not None else [])
    images, all_overlays, all_masks, size = [], [], [], 0
    for _, m in models:
        samples, maps, size = capture(m, positive, negative, words, settings)
        image = host.decode(vae, samples)[0, :, :, :3].cpu().float()
        masks = normalize(maps, settings.normalization)
        images.append(image)
        all_overlays.append(overlays(image, masks, settings.colormap, settings.alpha))
        all_masks.append(masks)
    return MapResult(torch.stack(images), torch.cat(all_overlays), torch.cat(all_masks), [w.text for w in words],
                     [label for label, _ in models], size)
