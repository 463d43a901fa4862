"""Per-word cross-attention heatmaps (after DAAM), captured while the host samples.

`HeatmapSink` is an attention sink (attention.py): every cross-attention call of the
sampling run hands it the post-softmax probabilities; it keeps the conditional half of a
CFG batch, averages heads, takes the columns of the tracked token positions, upsamples the
layer's token grid to the latent grid and adds it to one fixed-size accumulator. Memory is
that accumulator, however many steps run. Words are averaged over their sub-tokens at the
end; `normalize` and `colorize` turn the maps into masks and overlays.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tokens import SpecialTokens, Token, concept_positions, content_tokens

BLOCKS = ("all", "input", "middle", "output")
RESOLUTIONS = ("all", "1/8", "1/16", "1/32", "1/64")  # of the image side: the latent grid, then each downsample
NORMALIZATIONS = ("per word", "across words")
STOPWORDS = {"a", "an", "the", "of", "in", "on", "at", "by", "to", "for", "with", "and", "or", "is", "are", "as", "from"}
COLORMAPS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "jet": ((0, 0, 0.5), (0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0), (0.5, 0, 0)),
    "inferno": ((0, 0, 0.02), (0.34, 0.06, 0.43), (0.73, 0.21, 0.33), (0.98, 0.55, 0.04), (0.99, 1, 0.64)),
    "viridis": ((0.27, 0, 0.33), (0.23, 0.32, 0.55), (0.13, 0.57, 0.55), (0.37, 0.79, 0.38), (0.99, 0.91, 0.14)),
    "gray": ((0, 0, 0), (1, 1, 1)),
}


@dataclass(frozen=True)
class Word:
    text: str
    positions: tuple[int, ...]  # context positions of its tokens (every occurrence)


def prompt_words(prompt: str) -> list[str]:
    """The prompt's words as a user reads them: weights and brackets removed, embeddings kept."""
    text = re.sub(r":\s*[-+]?\d*\.?\d+\s*\)", ")", prompt)
    return [w for w in re.split(r"[\s,()\[\]{}]+", text) if w]


def locate_words(chunks: list[list[Token]], words: list[str], tokenize, special: SpecialTokens, explicit: bool) -> list[Word]:
    """Context positions of each word. Explicit words must all be found (else a clear error
    listing the prompt's words); the automatic list (every content word) skips stopwords
    and words the tokenizer merged into their neighbours."""
    found = []
    for word in words:
        needle = content_tokens(tokenize(word), special)
        positions = concept_positions(chunks, needle, special) if needle else []
        if positions:
            found.append(Word(word, tuple(positions)))
        elif explicit:
            raise ValueError(f"word {word!r} is not in the prompt")
    return found


def content_words(prompt: str) -> list[str]:
    """Every content word of the prompt once, in order (stopwords left out)."""
    seen: list[str] = []
    for w in prompt_words(prompt):
        if w.lower() not in STOPWORDS and w.lower() not in (s.lower() for s in seen):
            seen.append(w)
    return seen


def block_filter(blocks: str, resolution: str) -> tuple[str, int | None]:
    """Validated (block, downsample factor or None) for `HeatmapSink`."""
    if blocks not in BLOCKS:
        raise ValueError(f"unknown blocks {blocks!r}: use one of {', '.join(BLOCKS)}")
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {resolution!r}: use one of {', '.join(RESOLUTIONS)}")
    return blocks, None if resolution == "all" else RESOLUTIONS.index(resolution) - 1


def cond_rows(extra_options: dict, batch: int) -> list[int]:
    """Rows of the conditional half: the host stacks equal chunks, `cond_or_uncond[i] == 0`
    marking chunk i as conditional (uncond, cond or both, in any order)."""
    order = extra_options.get("cond_or_uncond") or [0]
    size = batch // len(order)
    return [i * size + j for i, kind in enumerate(order) if kind == 0 for j in range(size)]


def _grid(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int, int]:
    """(downsample factor, h, w) of a layer whose token grid has `tokens` cells."""
    height, width = latent_hw
    factor = 2 ** round(math.log2(math.sqrt(height * width / tokens)))
    h, w = math.ceil(height / factor), math.ceil(width / factor)
    if h * w != tokens:
        raise RuntimeError(f"cannot lay {tokens} attention cells out on a {height}x{width} latent")
    return int(math.log2(factor)), h, w


class HeatmapSink:
    """Sums per-position attention maps on the latent grid over layers, heads and steps."""

    def __init__(self, positions: list[int], latent_hw: tuple[int, int], blocks: str = "all",
                 resolution: str = "all", sigma_range: tuple[float, float] | None = None):
        self.positions = torch.tensor(positions, dtype=torch.long)
        self.latent_hw = latent_hw
        self.block, self.level = block_filter(blocks, resolution)
        self.sigma_range = sigma_range  # (high, low): capture while high >= sigma >= low
        self.total: torch.Tensor | None = None  # (P, H, W): the only state that grows with the image, not the steps
        self.calls = 0

    def nbytes(self) -> int:
        return 0 if self.total is None else self.total.numel() * self.total.element_size()

    def _wanted(self, extra_options: dict, level: int) -> bool:
        block = extra_options.get("block", ("",))[0]
        if self.block != "all" and block != self.block:
            return False
        if self.level is not None and level != self.level:
            return False
        if self.sigma_range is not None and "sigmas" in extra_options:
            sigma = float(extra_options["sigmas"].flatten()[0])
            high, low = self.sigma_range
            return low <= sigma <= high
        return True

    def __call__(self, layer: str, probs: torch.Tensor, extra_options: dict) -> None:
        level, h, w = _grid(self.latent_hw, probs.shape[2])
        if not self._wanted(extra_options, level):
            return
        rows = cond_rows(extra_options, probs.shape[0])
        maps = probs[rows].mean(dim=(0, 1))[:, self.positions.to(probs.device)]  # (HW, P)
        maps = maps.T.reshape(-1, 1, h, w).float()
        maps = F.interpolate(maps, size=self.latent_hw, mode="bilinear", align_corners=False)[:, 0]
        self.total = maps if self.total is None else self.total + maps
        self.calls += 1

    def word_maps(self, words: list[Word], index: dict[int, int]) -> torch.Tensor:
        """(words, H, W): each word's mean over its tokens, averaged over captured calls."""
        if self.total is None or not self.calls:
            raise RuntimeError("no cross-attention was captured: widen the timestep range or the block/resolution choice")
        mean = self.total / self.calls
        return torch.stack([mean[[index[p] for p in word.positions]].mean(0) for word in words])


def normalize(maps: torch.Tensor, how: str) -> torch.Tensor:
    """'per word': each map scaled to max 1; 'across words': each pixel's values share 1."""
    if how == "per word":
        return maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    if how == "across words":
        return maps / maps.sum(0, keepdim=True).clamp_min(1e-12)
    raise ValueError(f"unknown normalisation {how!r}: use one of {', '.join(NORMALIZATIONS)}")


def colorize(values: torch.Tensor, colormap: str) -> torch.Tensor:
    """(..., H, W) in [0, 1] -> (..., H, W, 3) through a piecewise-linear colormap."""
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}: use one of {', '.join(COLORMAPS)}")
    stops = torch.tensor(COLORMAPS[colormap], dtype=torch.float32)
    x = values.clamp(0, 1) * (len(stops) - 1)
    low = x.floor().long().clamp(max=len(stops) - 2)
    frac = (x - low)[..., None]
    return stops[low] * (1 - frac) + stops[low + 1] * frac


def overlays(image: torch.Tensor, masks: torch.Tensor, colormap: str, alpha: float) -> torch.Tensor:
    """Each mask (N, h, w), resized to the image (H, W, 3), coloured and blended over it."""
    size = image.shape[:2]
    resized = F.interpolate(masks[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return image[None] * (1 - alpha) + colorize(resized, colormap) * alpha
