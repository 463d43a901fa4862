"""Attention re-steering: the Forget-Me-Not training step and loop.

One step (METHOD.md): a concept latent (encoded image, or pure noise), noise at a uniform
timestep, a prompt from the concept's templates, a UNet forward with the attn2 hooks, and
the loss ||attention on the concept's token columns||_2 over all layers and heads,
minimised by AdamW on low-rank updates of the attn2 projections. Unlike the reference,
gradient clipping really clips, batch masks follow the host's head order, and by default
the update is aimed (see `aim.py`) so other words keep their attention.

Beyond the paper, an output term (weight `output_weight`, 0 = the paper's loss alone):
the concept's prompt should denoise as the same prompt with the concept's anchor in its
place ("a person", "an object", or nothing) does in the original model. Attention alone cannot finish the job: a causal text encoder copies the
concept into every later token, and a model reads a concept from a few percent of the
attention (ToyBench measures both). The original model is the teacher, run by switching
the deltas off, so no second copy of the UNet is held; with `negative_guidance` its target
lies past the anchor, away from the concept (`pushed_away`).
"""
from __future__ import annotations

import json
import logging
import math
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from . import aim, check_report, checks, gate, host
from .attention import ColumnEnergy, Routed, make_attn2_replace
from .checkpoint import Checkpoints, TrainingState, capture, resumed, save_state, settings_of, starting_state, state_path
from .concepts import Concept, keep_prompts, preserve_prompts, with_kept
from .latents import input_latents, noisy
from .lora import FULL_RANK, LowRankDelta, disabled, export_kohya
from .memory import Precision, check_precision, checkpointed
from .optim import ColumnAdamW
from .patch import ForgetPatch, model_card, save_patch
from .tokens import SpecialTokens, anchor_alignment, column_mask, concept_positions, content_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainMode:
    projections: tuple[str, ...]
    aimed: bool
    description: str
    dense: bool = False  # whole-matrix updates (the reference recipe), not low-rank
    token_rows: bool = False  # the concept's rows of the text encoder's token table, no UNet weight (token_rows.py)
    gated: bool = False  # an edit of the key input behind a gate on the concept's token vectors (gate.py)


MODES: dict[str, TrainMode] = {
    "aimed k/v": TrainMode(("to_k", "to_v"), True, "LoRA on attn2 to_k/to_v, confined to the concept's context directions"),
    "aimed k": TrainMode(("to_k",), True, "LoRA on attn2 to_k only, aimed"),
    "k/v": TrainMode(("to_k", "to_v"), False, "ordinary LoRA on attn2 to_k/to_v"),
    "all attn2": TrainMode(("to_q", "to_k", "to_v", "to_out.0"), False, "ordinary LoRA on every attn2 projection"),
    "reference": TrainMode(("to_q", "to_k", "to_v", "to_out.0"), False,
                           "the paper's recipe: every attn2 weight trained whole (large patch; use its lr ~1e-5)", dense=True),
    "token rows": TrainMode((), False, "the concept's own words' rows in the text encoder, UNet untouched: prompts "
                                       "without those words stay exactly as they were, but other phrasings still reach "
                                       "the concept (connect the CLIP output)", token_rows=True),
    "gated k": TrainMode(("to_k",), False, "an edit of the key input behind a gate that opens only on prompts with "
                                           "the concept's words: prompts without them reach the UNet exactly as they "
                                           "were; not a LoRA (only this pack applies it), and other phrasings that "
                                           "do not open the gate still reach the concept", gated=True),
}


# The warm start edits every concept's rows at once; beyond a few concepts with no keep list
# it moves their neighbours more than it helps. ToyBench (H, warm start against re-steering
# alone, same run): one concept mean 0.980 against 0.975, three concepts 0.947 against
# 0.931, identities 0.955 against 0.937, but objects 0.873 against 0.887, styles 0.879
# against 0.971, all but two 0.715 against 0.810. A keep list holds the neighbours in the
# edit (styles with the rest kept 0.994, all but two 0.915), so with one it always runs.
WARM_START_MAX_CONCEPTS = 3


# The in-run erasure (checks.py) at which a run stops, read off ToyBench (bench/quality.json,
# 'self_check'): see docs/self_check.md, "Stopping on a target".
DEFAULT_TARGET = 1.0
MAX_TARGET = 1.5


@dataclass
class ForgetConfig:
    steps: int = 150               # the paper uses 35; ToyBench: 150 erases more than 100 (bench/quality.json)
    learning_rate: float = 1e-1    # AdamW on the (head-scaled) low-rank factors
    rank: int = 4                  # directions (aimed; plus copy_rank(rank) for copies) or LoRA rank per concept
    seed: int = 0
    mode: str = "aimed k/v"        # a key of MODES
    batch_size: int = 1
    include_end_token: bool = False
    output_weight: float = 10.0    # the output term (module docstring); 0 = the paper's loss
    negative_guidance: float = 0.5  # the output term's target pushed past the anchor (`pushed_away`); 0 = the anchor's
    max_grad_norm: float = 1.0     # really applied, every step
    weight_decay: float = 0.01
    resolution: int = 512          # pixel size of pure-noise latents when no image is given
    precision: str = "fp32"        # autocast: "fp32" (none), "bf16", "fp16" (memory.py)
    gradient_checkpointing: bool = False  # recompute UNet blocks in backward (memory.py)
    keep: tuple[str, ...] = ()     # concepts to keep (the preservation term); see `build_examples`
    warm_start: bool = True        # start from a closed-form K/V edit (`warm_start`); see `warm_starts`
    target: float = DEFAULT_TARGET  # stop once every concept's in-run erasure reaches it (checks.py); 0 = run all steps
    check_every: int = checks.DEFAULT_CHECK_EVERY  # steps between in-run checks

    def warm_starts(self, n_concepts: int) -> bool:
        """Whether this run starts from the closed-form edit (see WARM_START_MAX_CONCEPTS)."""
        return (self.warm_start and MODES[self.mode].aimed
                and (n_concepts <= WARM_START_MAX_CONCEPTS or bool(self.keep)))

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.output_weight < 0:
            raise ValueError(f"output_weight must be 0 or more, got {self.output_weight}")
        if self.negative_guidance < 0:
            raise ValueError(f"negative_guidance must be 0 or more, got {self.negative_guidance}")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if not 0 <= self.target <= MAX_TARGET:
            raise ValueError(f"target must be between 0 (run every step) and {MAX_TARGET:g}, got {self.target}: it is "
                             "the in-run erasure at which training stops (1 = the anchor's prediction)")
        if self.check_every < 1:
            raise ValueError(f"check_every must be at least 1, got {self.check_every}")
        check_precision(self.precision)


@dataclass
class Example:
    """One training prompt: its context (1, T, D), the concept's column mask (T,), the
    anchor context (1, T', D) of the same prompt with the anchor in the concept's place, and the copies of
    the concept in later tokens (rows of context minus their anchor twins, (N, D))."""

    concept: int
    context: torch.Tensor
    mask: torch.Tensor
    anchor: torch.Tensor
    copies: torch.Tensor
    pooled: torch.Tensor | None = None  # (1, width): SDXL's vector conditioning needs it
    anchor_pooled: torch.Tensor | None = None
    # The closed-form warm start's pairs: context rows (N, D) of the concept's tokens and
    # of the later tokens that copy it, and what each should read as (its anchor twin).
    edit_rows: torch.Tensor | None = None
    edit_targets: torch.Tensor | None = None


@dataclass
class ForgetResult:
    lora: dict[str, torch.Tensor]
    metadata: dict[str, str]
    losses: list[float] = field(default_factory=list)
    report: check_report.CheckReport | None = None


KEEP = -1  # Example.concept of a kept concept's prompt


def build_examples(clip, concepts: list[Concept], include_end: bool, keep: tuple[str, ...] = ()) -> list[Example]:
    """Encode every template prompt of every concept and locate the concept's tokens.

    With a keep list, the preservation term: each concept's templates also appear beside
    each kept concept (their anchor versions keep it), and the kept concepts' own prompts
    join as examples with no concept columns whose anchor is the prompt itself, so the
    output term holds the original model's prediction on them, and the aim avoids them."""
    special = SpecialTokens(**host.special_tokens(clip))
    examples = [_kept_example(clip, prompt) for prompt in keep_prompts(keep)]
    concepts = [with_kept(c, keep) for c in concepts]
    for index, concept in enumerate(concepts):
        needle = content_tokens(host.tokenize(clip, concept.text), special)
        if not needle:
            raise ValueError(f"concept {concept.text!r} tokenizes to nothing usable: give words or embedding:NAME")
        anchor_length = len(content_tokens(host.tokenize(clip, concept.anchor), special))
        for prompt, anchor in zip(concept.prompts(), concept.anchor_prompts()):
            chunks = host.tokenize(clip, prompt)
            positions = concept_positions(chunks, needle, special, include_end)
            if not positions:
                raise ValueError(f"concept {concept.text!r} was not found in its prompt {prompt!r} after tokenizing")
            (context, pooled), (anchor_context, anchor_pooled) = host.encode_pooled(clip, prompt), host.encode_pooled(clip, anchor)
            mask = column_mask(positions, context.shape[1])
            exact = concept_positions(chunks, needle, special, False)
            pairs = anchor_alignment(chunks, host.tokenize(clip, anchor), exact, anchor_length)
            rows, twins = [i for i, _ in pairs], [j for _, j in pairs]
            copies = context[0, rows] - anchor_context[0, twins]
            target = _concept_target(anchor_context[0], exact[0], anchor_length)
            edit_rows = torch.cat([context[0, exact], context[0, rows]])
            edit_targets = torch.cat([target.expand(len(exact), -1), anchor_context[0, twins]])
            examples.append(Example(index, context, mask, anchor_context, copies, pooled, anchor_pooled,
                                    edit_rows, edit_targets))
    return examples


def _concept_target(anchor_context: torch.Tensor, start: int, anchor_length: int) -> torch.Tensor:
    """What the concept's tokens should read as: the mean of the anchor's words where the
    concept stood, or with no anchor the word before the gap (same causal prefix)."""
    if anchor_length:
        return anchor_context[start:start + anchor_length].mean(0)
    return anchor_context[start - 1]


def _kept_example(clip, prompt: str) -> Example:
    context, pooled = host.encode_pooled(clip, prompt)
    return Example(KEEP, context, torch.zeros(context.shape[1]), context, context.new_zeros((0, context.shape[-1])),
                   pooled, pooled)


_PRESERVE_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cached(clip, name: str, compute: Callable[[], object]) -> object:
    """`compute()` once per text encoder state: what is cached depends only on the encoder's
    weights, patches and layer choice, and the preserve prompts take a few seconds on a CPU
    for a full-size encoder."""
    module, key = host.text_encoder_state(clip)
    per_encoder = _PRESERVE_CACHE.setdefault(module, {})
    if (key, name) not in per_encoder:
        per_encoder[key, name] = compute()
    return per_encoder[key, name]


def preserve_contexts(clip) -> torch.Tensor:
    """The preserve prompts' contexts (N, 77, D), the empty prompt included, encoded once per
    text encoder state and shared by every run."""
    return _cached(clip, "contexts", lambda: host.encode_many(clip, preserve_prompts()))


def preserve_moment(clip) -> aim.SecondMoment:
    """Second moment of the preserve prompts' contexts, cached like them."""
    def moment() -> aim.SecondMoment:
        contexts = preserve_contexts(clip)
        return aim.SecondMoment(contexts.shape[-1]).add(contexts.reshape(-1, contexts.shape[-1]))
    return _cached(clip, "moment", moment)


def anchor_moment(examples: list[Example]) -> aim.SecondMoment:
    """Second moment of the examples' anchor contexts (a kept prompt is its own anchor)."""
    own = aim.SecondMoment(examples[0].context.shape[-1])
    for e in examples:
        own.add(e.anchor[0])
    return own


def preserved(clip, examples: list[Example]) -> aim.SecondMoment:
    """The contexts an update must leave alone: the preserve prompts and the training
    prompts' anchor versions."""
    return preserve_moment(clip).merged(anchor_moment(examples))


def concept_basis(examples: list[Example], preserve: aim.SecondMoment, n_concepts: int,
                  rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Directions each concept's tokens use and `preserve` avoids: `rank` per concept, plus
    `copy_rank(rank)` for the copies of the concept in later tokens, which attention
    re-steering cannot reach. In large runs each one's directions also avoid the others'
    rows (OTHER_CONCEPTS_FROM). Returns the orthonormal basis (dim, columns) and
    each column's concept (columns,): the basis keeps the blocks in concept order."""
    own = [_concept_rows(examples, c) for c in range(n_concepts)]
    everyone = None  # all concepts' rows, for runs large enough to avoid each other
    if n_concepts >= OTHER_CONCEPTS_FROM:
        everyone = aim.SecondMoment(preserve.total.shape[0])
        for rows in own:
            everyone.add(torch.cat(rows))
    bases, owners = [], []
    for c, (rows, copies) in enumerate(own):
        held = preserve
        if everyone is not None:
            held = aim.blended(preserve, everyone.without(torch.cat([rows, copies])), OTHER_CONCEPTS_WEIGHT)
        bases.append(aim.concept_directions(rows, held, min(rank, rows.shape[0])))
        if copy_rank(rank) and copies.shape[0]:
            bases.append(aim.concept_directions(copies, held, min(copy_rank(rank), copies.shape[0])))
        owners += [c] * (sum(b.shape[1] for b in bases) - len(owners))
    _check_room(owners, n_concepts, rank, preserve.total.shape[0])
    return aim.combine_bases(bases), torch.tensor(owners)


def _check_room(owners: list[int], n_concepts: int, rank: int, dim: int) -> None:
    """The aimed directions of all concepts must fit in the text context's width."""
    if len(owners) > dim:
        raise ValueError(f"{n_concepts} concepts at rank {rank} need {len(owners)} aimed directions, but the text "
                         f"context has only {dim}: lower rank, or forget the concepts in several runs and fuse the "
                         "patches with Merge Forget Patches")


def _concept_rows(examples: list[Example], concept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A concept's token rows and its copies' rows over all its examples."""
    mine = [e for e in examples if e.concept == concept]
    return torch.cat([e.context[0][e.mask > 0] for e in mine]), torch.cat([e.copies for e in mine])


# From OTHER_CONCEPTS_FROM concepts on, each concept's directions also avoid the other
# concepts' rows, OTHER_CONCEPTS_WEIGHT as much as the preserve set as a whole. In a large
# run the concepts are mostly unrelated, and without it one concept's block moves the
# others' tokens so that steps on different concepts pull against each other: 50 made-up
# names on the tests' random SD1 model, 150 steps (attention share after / before on
# held-out templates; largest change of any word in prompts without them): without 0.37-0.51
# and 3.2-fold, weight 1 0.38-0.39 and 0.75-fold (weight 4: 0.40-0.47, 3.6-fold); at 750
# steps 0.20-0.22 and 2.3-fold, while without it the loss climbed back. A small run is often
# one family (a category) whose members share directions that all of them should lose, and
# there avoiding each other erases less. ToyBench H without / with: three concepts 0.934 /
# 0.922, the identity, object and style categories 0.973 / 0.955, 0.947 / 0.889, 0.967 /
# 0.961; all but two (ten concepts) 0.859 / 0.872, with the rest kept 0.970 / 0.980.
OTHER_CONCEPTS_FROM = 10
OTHER_CONCEPTS_WEIGHT = 1.0


# The warm start's hold on ordinary prompts. ToyBench, star's single run (H): 0.862 at 0.25,
# 0.907 at 1, 0.906 at 4, against 0.855 without the warm start; ring 0.950 / 0.945 / 0.971
# against 0.968. 4 keeps the neighbours best.
WARM_START_PRESERVE = 4.0
# The kept concepts' prompts weigh this much more than the preserve set in the warm start.
# ToyBench, star forgotten with neon and zebra kept (40 steps): the mean output drift on
# five prompts of the kept styles without star was 0.0129 with no keep list, 0.0102 at 0,
# 0.0082 at 1, 0.0068 at 4, 0.0061 at 16, while star's prompts moved to the anchor alike.
WARM_START_KEEP = 4.0


def warm_start(patcher, deltas: dict[str, LowRankDelta], examples: list[Example], preserve: aim.SecondMoment,
               preserve_weight: float = WARM_START_PRESERVE) -> None:
    """UCE's closed-form K/V edit, confined to the aimed directions, as the starting update.

    For each projection W the edit dW makes every concept row x read as its target t
    (W x + dW x = W t) while holding the preserved contexts P:
    min |dW X^T - W (T - X)^T|^2 + preserve_weight * N |dW|_P^2, so
    dW = W (T - X)^T X (X^T X + preserve_weight * N * M_P)^-1. Its projection on the aimed
    basis B (down = B^T) sets up = dW B / scale; re-steering then refines it.

    A keep list's prompts join M_P with WARM_START_KEEP times the preserve set's weight: a
    handful of prompts among thousands of preserve rows would otherwise barely count.

    Called with `patcher` loaded: its weights are then the model's own (with any patches
    stacked on it), never another clone's that the host had merged into the shared tensors."""
    rows = torch.cat([e.edit_rows for e in examples if e.edit_rows is not None]).double()
    targets = torch.cat([e.edit_targets for e in examples if e.edit_targets is not None]).double()
    kept = aim.SecondMoment(rows.shape[1])
    for e in examples:
        if e.concept == KEEP:
            kept.add(e.context[0])
    held = aim.blended(preserve, kept, WARM_START_KEEP).matrix()
    system = aim.ridged(rows.T @ rows + preserve_weight * len(rows) * held, 1e-3)
    edit = torch.linalg.solve(system, ((targets - rows).T @ rows).T).T  # (T - X)^T X system^-1
    state = patcher.model.state_dict()
    for key, delta in deltas.items():
        weight = state[key].double().cpu()
        basis = delta.down.T.double().cpu()
        with torch.no_grad():
            delta.up.copy_((weight @ edit @ basis / delta.scale).to(delta.up))


def copy_rank(rank: int) -> int:
    """Directions spent on the concept's copies in later tokens, beside its own `rank`.

    Half as many as its own. One per four was measured too (bench-quality, ToyBench): it
    moves the later words that carry the copy less, so the whole object category rose
    from H 0.787 to 0.798, but it erased less and Doctor Vex fell from 0.992 to 0.853,
    three concepts from 0.909 to 0.882."""
    return rank // 2


def build_deltas(patcher, layers: list[host.Attn2Layer], mode: TrainMode, rank: int, basis: torch.Tensor | None,
                 generator: torch.Generator) -> dict[str, LowRankDelta]:
    deltas = {}
    for layer in layers:
        keys = [layer.weight_key(p) for p in mode.projections]
        scale = layer.dim_head ** -0.5
        for key, (out_features, in_features) in host.weight_shapes(patcher, keys).items():
            if mode.dense:
                deltas[key] = LowRankDelta.dense(out_features, in_features)
            elif basis is not None:
                deltas[key] = LowRankDelta.aimed(out_features, basis, scale)
            else:
                deltas[key] = LowRankDelta.free(out_features, in_features, rank, scale, generator)
    return deltas


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


def _group_by_length(samples: list[Sample]) -> list[list[Sample]]:
    """Samples whose context and anchor lengths agree, so each group stacks into one batch."""
    groups: dict[tuple[int, int], list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[sample.context.shape[1], sample.anchor.shape[1]].append(sample)
    return list(groups.values())


def forget(patcher, clip, concepts: list[Concept], config: ForgetConfig,
           latents: dict[int, torch.Tensor] | None = None, progress=None,
           checkpoints: Checkpoints | None = None, resume: Path | None = None) -> ForgetResult:
    """Train a forget patch for `concepts` on a clone of `patcher`; the input is untouched.

    `checkpoints` writes a patch and its training state every N steps; `resume` (a state
    file) continues such a run from its step, with the same settings, to `config.steps`.
    Mode 'token rows' trains the text encoder's rows instead (`token_rows.py`)."""
    config.validate()
    mode = MODES[config.mode]
    if (mode.token_rows or mode.gated) and (checkpoints is not None or resume is not None):
        raise ValueError(f"mode '{config.mode}' trains in seconds and writes no checkpoints: set save_every to 0 and "
                         "resume_from to none")
    if mode.token_rows:
        from .token_rows import forget_token_rows  # imports this module: the text-encoder side builds on its loss

        return forget_token_rows(patcher, clip, concepts, config, latents, progress)
    generator = torch.Generator().manual_seed(config.seed)
    layers = host.attn2_layers(patcher)
    settings = settings_of(config, concepts=[c.text for c in concepts], base_fingerprint=host.model_fingerprint(patcher, layers))
    state = starting_state(resume, checkpoints, settings, config.steps)
    examples = build_examples(clip, concepts, config.include_end_token, config.keep)
    concept_gate = gate_for(clip, examples) if mode.gated else None
    preserve = preserved(clip, examples) if mode.aimed else None
    basis, owners = concept_basis(examples, preserve, len(concepts), config.rank) if mode.aimed else (None, None)
    rank = basis.shape[1] if mode.aimed else config.rank
    device = host.device()
    channels = patcher.model.diffusion_model.in_channels
    size = config.resolution // 8
    source = LatentSource({k: v.float() for k, v in (latents or {}).items()}, (channels, size, size))
    sampling = host.model_sampling(patcher)
    stuff = checks.material(clip, concepts, config.keep, sampling, (channels, size, size), latents)

    with torch.inference_mode(False):
        deltas = gate.key_input_edits(layers, rank, generator) if mode.gated else build_deltas(
            patcher, layers, mode, rank, basis, generator)
        params = [p for d in deltas.values() for p in d.parameters() if p.requires_grad]
        for d in deltas.values():
            d.to(device)
        optimizer = make_optimizer(params, config, owners)
        sink = ColumnEnergy()
        route = Routed(sink)
        clone = patcher.clone()
        if concept_gate is not None:
            clone.set_model_attn2_patch(gate.gated_key_patch(layers, deltas, concept_gate))
        host.register_attn2(clone, layers, lambda layer, previous: make_attn2_replace(layer.module, route, previous))
        precision = Precision(config.precision, device)
        blocks = host.unet_blocks(clone) if config.gradient_checkpointing else []
        start, losses = resumed(state, params, optimizer, generator, progress)
        with host.trainable_unet(clone, {} if mode.gated else deltas) as unet, checkpointed(blocks, sink.recomputing):
            if config.warm_starts(len(concepts)) and state is None:
                warm_start(clone, deltas, examples, preserve)
            checker = checks.SelfCheck(stuff, unet, lambda: disabled(deltas), route, config.target, config.steps,
                                       config.check_every, earlier=state.checks if state is not None else ())
            started, done = time.perf_counter(), start
            for step in range(start, config.steps):
                batch = [_draw(examples, source, sampling, generator, step * config.batch_size + b) for b in range(config.batch_size)]
                with precision.autocast():
                    loss = step_loss(unet, sink, batch, deltas, config.output_weight, config.negative_guidance, device)
                optimizer.zero_grad(set_to_none=True)
                precision.backward(loss)
                grad_norm = precision.unscale_and_clip(optimizer, params, config.max_grad_norm)
                check_finite(step, loss, grad_norm, precision.scaling)
                _activate(optimizer, owners, batch)
                precision.step(optimizer)
                losses.append(float(loss.detach()))
                done = step + 1
                stop = checker.due(done) and checker.check(done)
                if not stop and checkpoints is not None and checkpoints.due(done, config.steps):
                    _write_checkpoint(checkpoints.path_for(done), deltas, patcher, layers, concepts,
                                      replace(config, steps=done), rank, settings,
                                      capture(done, params, optimizer, generator, losses, checker.report.history))
                if progress is not None:
                    progress.step()
                if stop:
                    break
            report = checker.finish(done, time.perf_counter() - started)
        for p in params:
            p.requires_grad_(False)

    lora, gate_fields = gate.to_file(deltas, concept_gate) if mode.gated else (export_kohya(deltas), {})
    check_finite_tensors(lora)
    metadata = {**describe(patcher, layers, concepts, replace(config, steps=report.steps), rank, losses, report),
                **gate_fields}
    log.info("Forget-Me-Not: %d of %d steps, loss %.4f -> %.4f; %s", report.steps, config.steps, losses[0], losses[-1],
             check_report.verdict(report))
    return ForgetResult(lora, metadata, losses, report)


def gate_for(clip, examples: list[Example]) -> gate.ConceptGate:
    """Mode 'gated k': the gate from the concepts' tokens in their training prompts, shut on
    every token of the preserve prompts (the empty one, a sampler's usual negative, among
    them) and of the kept prompts."""
    rows = [e.context[0][e.mask > 0] for e in examples if e.concept != KEEP]
    others = list(preserve_contexts(clip)) + [e.context[0] for e in examples if e.concept == KEEP]
    return gate.ConceptGate.fit(rows, others, whole_prompt=True)


def make_optimizer(params: list[torch.Tensor], config: ForgetConfig, owners: torch.Tensor | None) -> torch.optim.Optimizer:
    """AdamW; with several concepts in an aimed run, AdamW that steps only the present
    concepts' columns (`optim.py` says why)."""
    if owners is None or len(owners.unique()) < 2:
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return ColumnAdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def _activate(optimizer: torch.optim.Optimizer, owners: torch.Tensor | None, batch: list[Sample]) -> None:
    """Tell a ColumnAdamW which columns this batch's concepts own. A kept prompt's sample
    holds every concept's edit to the original output, so it steps every column."""
    if not isinstance(optimizer, ColumnAdamW):
        return
    present = torch.tensor([sample.concept for sample in batch])
    optimizer.active = None if bool((present == KEEP).any()) else torch.isin(owners, present)


def _write_checkpoint(path: Path, deltas: dict[str, LowRankDelta], patcher, layers, concepts: list[Concept],
                      config: ForgetConfig, rank: int, settings: dict, state: TrainingState) -> None:
    """The patch as it stands after `config.steps` steps, and the state to resume from it."""
    lora = export_kohya(deltas)
    check_finite_tensors(lora)
    save_patch(ForgetPatch(lora, describe(patcher, layers, concepts, config, rank, state.losses)), path)
    save_state(state_path(path), state, settings)


def step_loss(unet, sink: ColumnEnergy, batch: list[Sample], deltas: dict[str, LowRankDelta],
              output_weight: float, negative_guidance: float, device: torch.device) -> torch.Tensor:
    """||target columns||_2 over every layer and head of the whole batch, plus
    `output_weight` times the mean squared difference between the patched model's noise
    prediction for the concept's prompt and the original model's for the anchor prompt
    (pushed away from the concept with `negative_guidance`).

    Samples whose contexts differ in length run as separate forwards; summing squares
    across them keeps the norm exactly that of the concatenated batch.
    """
    sink.reset(None)
    output_sq = torch.zeros((), device=device)
    count = 0
    for group in _group_by_length(batch):
        x, context, anchor, mask, sigma, original = (torch.cat([g[i] for g in group]).to(device) for i in (0, 1, 2, 3, 4, 8))
        pooled, anchor_pooled, original_pooled = (_joined([g[i] for g in group], device) for i in (5, 6, 9))
        if output_weight:
            with torch.no_grad(), disabled(deltas), sink.paused():
                teacher = unet(x, sigma, anchor, anchor_pooled)
                if negative_guidance and any(g.concept != KEEP for g in group):  # a kept prompt's target is its own
                    teacher = pushed_away(teacher, unet(x, sigma, original, original_pooled), negative_guidance)
        sink.mask = mask
        student = unet(x, sigma, context, pooled)
        if output_weight:
            scale = sigma.reshape(-1, *([1] * (x.ndim - 1)))
            output_sq = output_sq + ((student - teacher) / scale).float().pow(2).sum()
            count += student.numel()
    loss = sink.sum_squares.clamp_min(1e-12).sqrt()  # a kept prompt has no concept columns: no NaN gradient at 0
    if output_weight:
        loss = loss + output_weight * output_sq / count
    return loss


def pushed_away(anchor: torch.Tensor, concept: torch.Tensor, guidance: float) -> torch.Tensor:
    """The original model's prediction for the anchor prompt, moved `guidance` times its
    difference from the prediction for the concept's prompt further from the concept (ESD's
    negative guidance, aimed at the anchor rather than at the empty prompt).

    Matching the anchor alone stops where a noisy latent already shows the concept: there
    the anchor prompt's prediction keeps it too, so a residual of samples still draw it.
    A kept prompt is its own anchor, so its target is unchanged. ToyBench, the twelve
    single-concept runs (H, 48 seeds per prompt): 0 mean 0.983, star 0.917 (0.118 of its
    samples left); 0.5 mean 0.991, star 0.978 (0.021), the lowest Doctor Vex 0.978; 1 mean
    0.987, the neighbours lose more (Doctor Vex 0.966)."""
    return anchor - guidance * (concept - anchor)


def _joined(rows: list[torch.Tensor | None], device: torch.device) -> torch.Tensor | None:
    """Pooled embeddings of a group as one batch (None when the encoder gives none)."""
    return None if any(r is None for r in rows) else torch.cat(rows).to(device)


class Sample(NamedTuple):
    """One training sample. `original` (and its pooled) is the concept's prompt as the
    original model reads it, for the teacher's negative guidance: the same tensor as
    `context` when the update lives in the UNet, the unedited encoding when it lives in
    the text encoder (`token_rows.py`)."""

    x: torch.Tensor
    context: torch.Tensor
    anchor: torch.Tensor
    mask: torch.Tensor
    sigma: torch.Tensor
    pooled: torch.Tensor | None
    anchor_pooled: torch.Tensor | None
    concept: int
    original: torch.Tensor
    original_pooled: torch.Tensor | None


def _draw(examples: list[Example], source: LatentSource, sampling, generator: torch.Generator, index: int) -> Sample:
    """One sample, concepts taken in turn."""
    concepts = sorted({e.concept for e in examples})
    concept = concepts[index % len(concepts)]
    pool = [e for e in examples if e.concept == concept]
    example = pool[int(torch.randint(len(pool), (1,), generator=generator))]
    x, sigma, _ = noisy(sampling, source.draw(concept, generator)[None], generator)
    return Sample(x, example.context, example.anchor, example.mask[None], sigma, example.pooled, example.anchor_pooled,
                  example.concept, example.context, example.pooled)


def check_finite(step: int, loss: torch.Tensor, grad_norm: torch.Tensor, scaling: bool = False) -> None:
    """A non-finite loss, or gradient norm (unless fp16 loss scaling skips such steps), ends the run."""
    if not torch.isfinite(loss) or not (scaling or torch.isfinite(grad_norm)):
        raise RuntimeError(
            f"Forget Train diverged at step {step + 1} (loss {float(loss)}, gradient norm {float(grad_norm)}): "
            "no patch was produced; lower learning_rate or steps"
        )


def check_finite_tensors(lora: dict[str, torch.Tensor], producer: str = "Forget Train") -> None:
    bad = [k for k, v in lora.items() if not torch.isfinite(v).all()]
    if bad:
        raise RuntimeError(f"{producer} produced non-finite weights in {len(bad)} tensors (e.g. {bad[0]}): "
                           "no patch was produced; lower learning_rate")


def describe(patcher, layers, concepts: list[Concept], config: ForgetConfig, rank: int, losses: list[float],
             report: check_report.CheckReport | None = None) -> dict[str, str]:
    """Patch header metadata (safetensors metadata values are strings); with the run's
    check report, its figures (`fmn.self_check`) and verdict on the model card."""
    from . import __version__

    card = model_card(host.model_arch(patcher), [c.text for c in concepts], [c.category for c in concepts],
                      config.steps, config.mode, MODES[config.mode].token_rows, MODES[config.mode].gated,
                      check_report.verdict(report) if report is not None else "")
    measured = {check_report.REPORT_KEY: report.to_json(), "fmn.target": repr(config.target)} if report is not None else {}
    return {
        **measured,
        **card,
        "fmn.format": "forget-me-not/1",
        "fmn.pack_version": __version__,
        "fmn.concepts": json.dumps([c.text for c in concepts]),
        "fmn.categories": json.dumps([c.category for c in concepts]),
        "fmn.anchors": json.dumps([c.anchor for c in concepts]),
        "fmn.keep": json.dumps(list(config.keep)),
        "fmn.base_arch": host.model_arch(patcher),
        "fmn.base_fingerprint": host.model_fingerprint(patcher, layers),
        "fmn.context_dim": str(layers[0].context_dim),
        "fmn.mode": config.mode,
        "fmn.warm_start": str(config.warm_starts(len(concepts))).lower(),
        "fmn.output_weight": repr(config.output_weight),
        "fmn.negative_guidance": repr(config.negative_guidance),
        "fmn.rank": FULL_RANK if MODES[config.mode].dense else str(rank),
        "fmn.steps": str(config.steps),
        "fmn.learning_rate": repr(config.learning_rate),
        "fmn.seed": str(config.seed),
        "fmn.losses": json.dumps([round(x, 5) for x in losses]),
        "fmn.final_loss": repr(round(losses[-1], 6)) if losses and math.isfinite(losses[-1]) else "nan",
    }
