"""In-run checks: every Forget Train run measures what it did, on the model it trains.

A user's checkpoint has no oracle, so the signals come from forwards of the run's own UNet
and text encoder, on material the run never trained on: templates held out from the
concept's training templates (CHECK_TEMPLATES), a fixed check seed (independent of the
run's seed, and drawn from a generator of its own so training draws exactly what it drew
without checks) and several noise levels (CHECK_TIMESTEPS).

- erasure: how far the patched model's prediction on a held-out concept prompt moved from
  the original's toward the original's prediction for the anchor prompt, as a projection:
  <p(c) - o(c), o(a) - o(c)> / |o(a) - o(c)|^2, summed over prompts and seeds: 0 =
  unchanged, 1 = the anchor's; negative guidance aims past the anchor, so above 1 happens.
- collateral: the root-mean-square change of the prediction on ordinary prompts (a few of
  the preserve prompts, and the keep list's prompts), absolute (in noise units: the noise
  itself has RMS 1) and relative to the concept prompts' own change.
- attention: the concept tokens' share of cross-attention on the held-out prompts before
  and after, and the largest relative change of any word's share in the ordinary prompts.

The original model is the training model with its edit switched off (`original`), so no
second UNet is held; its predictions are computed once, before the first step.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch

from . import host
from .attention import Routed, TokenShare
from .check_report import CheckReport
from .concepts import Concept, keep_prompts, preserve_prompts
from .tokens import SpecialTokens, concept_positions, content_tokens

# Held-out phrasings per category: none is a training template (TEMPLATES in concepts.py).
CHECK_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": ("a drawing of {}", "{} on a wooden table"),
    "style": ("a city street in the style of {}", "a still life by {}"),
    "identity": ("a photograph of {} standing outside", "{} looking at the camera"),
    "nsfw": ("a {} person at the beach", "a drawing of a {} figure"),
}
GENERIC_CHECK_TEMPLATES = ("a picture showing {}", "{}, detailed")  # custom templates
CHECK_TIMESTEPS = (250, 500, 750)  # noise levels, low to high
CHECK_SEED = 20_231
ORDINARY_PROMPTS = 4  # preserve prompts measured for collateral, spread over the list
DEFAULT_CHECK_EVERY = 25
# Rows of one check forward: two prompts at the three levels. On ToyBench's CPU model, where
# a forward's fixed cost dominates, one forward per prompt took 1.7x the time of one such
# batch (measured side by side). Six rows without gradients keep no activations for a
# backward pass, unlike the training step.
CHECK_ROWS = 6


@dataclass(frozen=True)
class Item:
    """One prompt measured at every noise level: its context and the columns of its concept
    (or of its words, for an ordinary prompt)."""

    context: torch.Tensor           # (1, T, D)
    pooled: torch.Tensor | None
    columns: list[int]


@dataclass
class ConceptItems:
    text: str
    anchor: str
    prompts: list[str]
    items: list[Item]               # the held-out concept prompts, as the original encoder reads them
    anchors: list[Item]             # the same prompts with the anchor in the concept's place
    x: torch.Tensor                 # (prompts * levels, C, H, W) noisy latents
    sigma: torch.Tensor             # (prompts * levels,)


def held_out(concept: Concept) -> Concept:
    """`concept` with the check templates of its category in place of its training ones."""
    pool = CHECK_TEMPLATES.get(concept.category, GENERIC_CHECK_TEMPLATES)
    return Concept(concept.text, concept.category, tuple(t for t in pool if t not in concept.templates),
                   anchor=concept.anchor)


def _columns(clip, concept_text: str | None, prompt: str) -> list[int]:
    """The concept's positions in `prompt`; with no concept, the prompt's word positions."""
    special = SpecialTokens(**host.special_tokens(clip))
    chunks = host.tokenize(clip, prompt)
    if concept_text is not None:
        return concept_positions(chunks, content_tokens(host.tokenize(clip, concept_text), special), special)
    return list(range(1, 1 + len(content_tokens(chunks, special))))


def _item(clip, prompt: str, concept_text: str | None) -> Item:
    context, pooled = host.encode_pooled(clip, prompt)
    return Item(context, pooled, _columns(clip, concept_text, prompt))


def ordinary_prompts(keep: tuple[str, ...], concepts: list[Concept], clip) -> list[str]:
    """Collateral prompts: a spread of the preserve prompts and the keep list's prompts,
    without any that contain a forgotten concept's words (their change is intended)."""
    preserve = [p for p in preserve_prompts() if p]
    step = max(1, len(preserve) // ORDINARY_PROMPTS)
    return _unmentioned(preserve[::step][:ORDINARY_PROMPTS] + keep_prompts(keep), concepts, clip)


def watched_prompts(watch: tuple[str, ...], concepts: list[Concept], clip) -> list[str]:
    """The watched concepts' prompts (the keep list's templates), without any that contain a
    forgotten concept's words: concepts the user cares about, measured but not trained on."""
    return _unmentioned(keep_prompts(watch), concepts, clip)


def _unmentioned(prompts: list[str], concepts: list[Concept], clip) -> list[str]:
    special = SpecialTokens(**host.special_tokens(clip))
    needles = [content_tokens(host.tokenize(clip, c.text), special) for c in concepts]

    def mentions(prompt: str) -> bool:
        return any(concept_positions(host.tokenize(clip, prompt), n, special) for n in needles if n)
    return [p for p in prompts if not mentions(p)]


def _noisy(sampling, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 (1, C, H, W) noised once at each check level: (levels, C, H, W), (levels,)."""
    sigma = sampling.sigma(torch.tensor(CHECK_TIMESTEPS, dtype=torch.float32)).cpu()
    noise = torch.randn((len(CHECK_TIMESTEPS), *x0.shape[1:]), generator=generator)
    return sampling.noise_scaling(sigma, noise, x0.expand_as(noise)), sigma


def _x0(latents: torch.Tensor | None, shape: tuple[int, ...], index: int, generator: torch.Generator) -> torch.Tensor:
    """The clean latent a check sample starts from: the concept's own images when the run
    had them (as training draws them), else pure noise (as training without images does)."""
    noise = torch.randn(shape, generator=generator)[None]  # drawn either way: the seeds do not shift with images
    return noise if latents is None else latents[index % len(latents)][None].float()


@dataclass
class PromptSet:
    """Prompts measured before training and at its end, each at every check level."""

    prompts: list[str]
    items: list[Item]
    x: torch.Tensor                 # (prompts * levels, C, H, W)
    sigma: torch.Tensor             # (prompts * levels,)


@dataclass
class CheckMaterial:
    """Everything the checks measure on, built before training: the concepts' held-out
    prompts, the ordinary prompts (collateral) and the watched concepts' prompts."""

    concepts: list[ConceptItems]
    ordinary: PromptSet
    watched: dict[str, PromptSet]   # per watched concept


def _prompt_set(clip, prompts: list[str], sampling, shape: tuple[int, ...], generator: torch.Generator) -> PromptSet:
    xs = [_noisy(sampling, _x0(None, shape, 0, generator), generator) for _ in prompts]
    return PromptSet(prompts, [_item(clip, p, None) for p in prompts],
                     torch.cat([x for x, _ in xs]) if xs else torch.zeros(0),
                     torch.cat([s for _, s in xs]) if xs else torch.zeros(0))


def material(clip, concepts: list[Concept], keep: tuple[str, ...], sampling, shape: tuple[int, ...],
             latents: dict[int, torch.Tensor] | None = None, watch: tuple[str, ...] = ()) -> CheckMaterial:
    """Held-out prompts, their anchors, the ordinary and the watched prompts, encoded by the
    original encoder, and their noisy latents from the check seed (the watched prompts'
    drawn last, so a watch list leaves every other check's draws as they were)."""
    generator = torch.Generator().manual_seed(CHECK_SEED)
    per_concept = []
    for index, concept in enumerate(concepts):
        check = held_out(concept)
        prompts = check.prompts()
        xs = [_noisy(sampling, _x0((latents or {}).get(index), shape, i, generator), generator) for i in range(len(prompts))]
        per_concept.append(ConceptItems(
            concept.text, concept.anchor, prompts,
            [_item(clip, p, concept.text) for p in prompts],
            [_item(clip, a, None) for a in check.anchor_prompts()],
            torch.cat([x for x, _ in xs]), torch.cat([s for _, s in xs])))
    ordinary = _prompt_set(clip, ordinary_prompts(keep, concepts, clip), sampling, shape, generator)
    watched = {name: _prompt_set(clip, watched_prompts((name,), concepts, clip), sampling, shape, generator)
               for name in watch}
    return CheckMaterial(per_concept, ordinary, {name: w for name, w in watched.items() if w.prompts})


Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# (context, pooled) of concept `c`'s held-out prompt `i`, with the edit or without, for
# edits that live in the text encoder (mode 'token rows').
PatchedContext = Callable[[int, int, bool], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass
class Measured:
    """Predictions (in noise units) and attention shares of one set of prompts."""

    predictions: torch.Tensor  # (prompts * levels, C, H, W)
    shares: torch.Tensor       # (prompts * levels, T)


class SelfCheck:
    """Measures a training run at its checks: the original predictions once, then the
    patched model's whenever asked.

    `forward` is the training UNet's forward (edit on); `original()` switches the edit off;
    `route` is the sink router the run registered its attn2 hooks with, so the checks read
    attention through the same hooks; `patched_context` encodes a concept prompt with or
    without the edit (default: the original encoder's contexts, for edits in the UNet);
    `earlier` is a resumed run's check history, carried in its training state, so its report
    shows the whole run."""

    def __init__(self, stuff: CheckMaterial, forward: Forward, original: Callable[[], ContextManager], route: Routed,
                 target: float, budget: int, every: int, patched_context: PatchedContext | None = None,
                 earlier: Sequence[dict] = ()) -> None:
        self.stuff, self.forward, self.original, self.route = stuff, forward, original, route
        self.every, self.patched_context = every, patched_context
        self.report = CheckReport([c.text for c in stuff.concepts], [c.anchor for c in stuff.concepts], target, budget,
                                  history=list(earlier), held_out_prompts=[p for c in stuff.concepts for p in c.prompts],
                                  ordinary_prompts=stuff.ordinary.prompts, timesteps=list(CHECK_TIMESTEPS),
                                  check_seed=CHECK_SEED)
        with self._timed(), self.original():
            self.before = [self._concept(c, i, patched=False) for i, c in enumerate(stuff.concepts)]
            self.anchors = [self._run(c.anchors, c.x, c.sigma) for c in stuff.concepts]
            self.ordinary_before = self._measure(stuff.ordinary)
            self.watched_before = {name: self._measure(w) for name, w in stuff.watched.items()}
        self.after: list[Measured] = []

    @contextlib.contextmanager
    def _timed(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.report.check_seconds += time.perf_counter() - started

    def _run(self, items: list[Item], x: torch.Tensor, sigma: torch.Tensor) -> Measured:
        """Predictions and shares of `items`, each at every level, CHECK_ROWS rows a forward."""
        levels = len(CHECK_TIMESTEPS)
        predictions, shares = [], []
        device = host.device()
        with torch.no_grad():
            for start, group in _batches(items, max(1, CHECK_ROWS // levels)):
                rows = slice(start * levels, (start + len(group)) * levels)
                xs, sig = x[rows].to(device), sigma[rows].to(device)
                context = torch.cat([item.context.expand(levels, -1, -1) for item in group]).to(device)
                pooled = (None if group[0].pooled is None else
                          torch.cat([item.pooled.expand(levels, -1) for item in group]).to(device))
                sink = TokenShare()
                with self.route.to(sink):
                    out = self.forward(xs, sig, context, pooled)
                predictions.append((out.float() / sig.reshape(-1, 1, 1, 1).float()).cpu())
                shares.append(sink.shares().float().cpu())
        if not predictions:
            return Measured(torch.zeros(0), torch.zeros(0))
        return Measured(torch.cat(predictions), torch.cat(shares))

    def _measure(self, prompts: PromptSet) -> Measured:
        return self._run(prompts.items, prompts.x, prompts.sigma)

    def _concept(self, c: ConceptItems, index: int, patched: bool) -> Measured:
        items = c.items
        if self.patched_context is not None:
            items = [Item(*self.patched_context(index, i, patched), it.columns) for i, it in enumerate(c.items)]
        return self._run(items, c.x, c.sigma)

    def due(self, step: int) -> bool:
        """Whether a check follows `step` finished steps."""
        return step % self.every == 0 or step == self.report.budget

    def check(self, step: int) -> bool:
        """Measure erasure after `step` steps; True once every concept meets the target."""
        with self._timed():
            self.after = [self._concept(c, i, patched=True) for i, c in enumerate(self.stuff.concepts)]
        erasure = [self._erasure(i)[0] for i in range(len(self.after))]
        self._check_finite(f"the check after step {step}", torch.tensor(erasure))
        self.report.history.append({"step": step, "erasure": [round(e, 4) for e in erasure]})
        self.report.steps, self.report.erasure = step, erasure
        self.report.met = self.report.target > 0 and min(erasure) >= self.report.target
        return self.report.met

    def _erasure(self, index: int) -> tuple[float, list[float]]:
        """Concept `index`'s erasure overall and per level, from the last check."""
        original, anchor, patched = self.before[index].predictions, self.anchors[index].predictions, self.after[index].predictions
        levels = len(CHECK_TIMESTEPS)
        gap = (anchor - original).reshape(-1, levels, *original.shape[1:]).double()
        moved = (patched - original).reshape(gap.shape).double()
        along = (moved * gap).flatten(2).sum(-1).sum(0)  # (levels,)
        length = gap.pow(2).flatten(2).sum(-1).sum(0).clamp_min(1e-12)
        return float(along.sum() / length.sum()), [float(v) for v in along / length]

    def finish(self, step: int, train_seconds: float) -> CheckReport:
        """Complete the report after `step` steps, the run's last (checked there if it was not
        yet): erasure per level, collateral and attention."""
        report = self.report
        if not report.history or report.history[-1]["step"] != step:
            self.check(step)
        with self._timed():
            ordinary_after = self._measure(self.stuff.ordinary)
            watched_change = {name: self._measure(w).predictions - self.watched_before[name].predictions
                              for name, w in self.stuff.watched.items()}
        report.erasure_by_level = [[round(v, 4) for v in self._erasure(i)[1]] for i in range(len(self.after))]
        concept_change = torch.cat([(a.predictions - b.predictions).flatten() for a, b in zip(self.after, self.before)])
        report.collateral_by_level, report.collateral = _rms_change(ordinary_after.predictions,
                                                                    self.ordinary_before.predictions)
        concept_rms = float(concept_change.double().pow(2).mean().sqrt())
        report.collateral_relative = report.collateral / concept_rms if concept_rms > 0 else 0.0
        report.concept_share_before = [_column_share(m.shares, c.items) for m, c in zip(self.before, self.stuff.concepts)]
        report.concept_share_after = [_column_share(m.shares, c.items) for m, c in zip(self.after, self.stuff.concepts)]
        report.worst_word_change, report.worst_word = _worst_word(self.ordinary_before.shares, ordinary_after.shares,
                                                                   self.stuff.ordinary.items, report.ordinary_prompts)
        if watched_change:
            _watched(report, watched_change, concept_rms)
        report.train_seconds = train_seconds
        self._check_finite("the final check", torch.tensor([report.collateral, report.worst_word_change,
                                                            *(report.watched or {}).values()]))
        _round(report)
        return report

    @staticmethod
    def _check_finite(what: str, *tensors: torch.Tensor) -> None:
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise RuntimeError(f"Forget Train's checks diverged: {what} is not finite (NaN or inf); no patch was "
                               "produced. Lower learning_rate, or use precision fp32 if it was fp16")


def _batches(items: list[Item], size: int) -> list[tuple[int, list[Item]]]:
    """(first index, items) runs of at most `size` consecutive items that can share one
    forward: the same context length (a prompt over 77 tokens has more) and pooled or not."""
    out: list[tuple[int, list[Item]]] = []
    for index, item in enumerate(items):
        last = out[-1][1] if out else None
        if (last is not None and len(last) < size and last[0].context.shape == item.context.shape
                and (last[0].pooled is None) == (item.pooled is None)):
            last.append(item)
        else:
            out.append((index, [item]))
    return out


def _rms_change(after: torch.Tensor, before: torch.Tensor) -> tuple[list[float], float]:
    """RMS of after - before per level and overall (0 with no ordinary prompt)."""
    if after.numel() == 0:
        return [0.0] * len(CHECK_TIMESTEPS), 0.0
    change = (after - before).double().reshape(-1, len(CHECK_TIMESTEPS), *after.shape[1:])
    per_level = change.transpose(0, 1).flatten(1).pow(2).mean(1).sqrt()
    return [float(v) for v in per_level], float(change.pow(2).mean().sqrt())


def _watched(report: CheckReport, change: dict[str, torch.Tensor], concept_rms: float) -> None:
    """Each watched concept's RMS change, and all of theirs, relative to the concept prompts'
    own: what collateral says about the concepts the user named rather than about a few
    generic prompts."""
    def relative(t: torch.Tensor) -> float:
        return round(float(t.double().pow(2).mean().sqrt()) / concept_rms, 4) if concept_rms > 0 else 0.0
    report.watched = {name: relative(c) for name, c in change.items()}
    report.collateral_watched = relative(torch.cat([c.flatten() for c in change.values()]))


def _column_share(shares: torch.Tensor, items: list[Item]) -> float:
    """Mean share of the items' columns over their prompts and levels."""
    levels = len(CHECK_TIMESTEPS)
    totals = [float(shares[i * levels:(i + 1) * levels, item.columns].sum(-1).mean()) for i, item in enumerate(items)]
    return sum(totals) / len(totals)


def _worst_word(before: torch.Tensor, after: torch.Tensor, items: list[Item], prompts: list[str]) -> tuple[float, str]:
    """Largest |after - before| / before of any word's share (mean over levels), and where."""
    levels, worst, where = len(CHECK_TIMESTEPS), 0.0, ""
    for i, item in enumerate(items):
        b = before[i * levels:(i + 1) * levels, item.columns].mean(0)
        a = after[i * levels:(i + 1) * levels, item.columns].mean(0)
        change = ((a - b).abs() / b.clamp_min(1e-12))
        if change.numel() and float(change.max()) > worst:
            worst, where = float(change.max()), prompts[i] if i < len(prompts) else ""
    return worst, where


def _round(report: CheckReport) -> None:
    """Four decimals: the figures are estimates, and the header should stay small."""
    for name in ("collateral", "collateral_relative", "worst_word_change", "check_seconds", "train_seconds"):
        setattr(report, name, round(getattr(report, name), 4))
    for name in ("erasure", "collateral_by_level", "concept_share_before", "concept_share_after"):
        setattr(report, name, [round(v, 4) for v in getattr(report, name)])
