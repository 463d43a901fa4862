"""Hardening a forget patch against the recovery attack (beyond the paper).

An aimed patch changes what the concept's own words make the UNet read; everything else
in the text space is left open, and textual inversion through the patched model finds new
token rows that draw the concept again (`recovery.py`; docs/quality.md, "Recovery attack"). Hardening
plays that attack during training, AdvUnlearn's idea with an output loss in place of the
attention loss. Each round:

1. inverts the concept's images through the model as hardened so far, from a generic word,
   exactly as FMN_RecoveryAttack does, and adds the found rows (and as many random rows of
   the same size) in the concept's first template to the concept's contexts;
2. trains a LoRA on the linear layers of the UNet's transformer blocks so that under every
   one of those contexts, and the concept's own prompts, the concept's images denoise as
   they do under the anchor's prompt, while the model's own samples of the preserve
   prompts and the keep list's denoise as before.

The teacher is the patched model itself with the LoRA switched off: no second copy of the
UNet is held, and what the forget patch keeps stays kept. The result is a second patch,
applied after the forget patch it hardens (Apply Forget Patch, twice).

Why the transformer blocks and not attn2's text projections alone: every key and value
projection keeps full row rank under a low-rank edit, so some context always reproduces
the concept's keys and values; the model has to change what it does with them.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch

from . import check_report, host
from .concepts import Concept, filled, keep_prompts, preserve_prompts
from .inversion import InversionConfig, Prompts, invert
from .latents import noisy
from .lora import LowRankDelta, disabled, export_kohya
from .merge import concepts_of
from .patch import HARDEN_MODE, ForgetPatch, apply_patch, kohya_named, model_card
from .text_encoder import TextEncoders
from .loss import check_finite_tensors

# The word each category's inversion starts from: a generic one, so nothing of the
# concept's own words helps (FMN_RecoveryAttack's advice to its users).
INIT_WORDS = {"identity": "person", "object": "object", "style": "style", "nsfw": "person"}
INIT_FALLBACK = "thing"
INVERSION_LEARNING_RATE = 1e-2
IMAGES_PER_INVERSION = 8
SELF_SAMPLES = 8  # images of each concept sampled from the original model when none are given
SAMPLE_POSITIONS = 8 * 64 * 64  # latent positions per sampler call: eight 512 px SD images
LAYER = "transformer_blocks"


@dataclass(frozen=True)
class HardenConfig:
    rounds: int = 5
    steps: int = 500               # in all, split evenly over the rounds
    learning_rate: float = 1e-3    # Adam on the LoRA factors
    rank: int = 8
    batch_size: int = 16           # concept samples per step; as many kept-prompt samples beside them
    inversion_steps: int = 150     # each round's attack: as long as the attack to resist (docs/quality.md, "Recovery attack, hardened")
    num_tokens: int = 4            # rows the attack learns
    random_rows: int = 8           # random row sets added per round beside the found ones
    samples_per_prompt: int = 2    # the model's own samples of each preserve or kept prompt
    resolution: int = 512          # pixel size of those samples when no images are given
    seed: int = 0
    keep: tuple[str, ...] = field(default=())
    templates: tuple[str, ...] = field(default=())  # the attack's phrasings, taken in turn; () = each concept's first

    def attack_template(self, concept: Concept, round_: int) -> str:
        """The template a round's attack, and its random rows, use for `concept`."""
        return self.templates[round_ % len(self.templates)] if self.templates else concept.templates[0]

    def validate(self) -> None:
        for name in ("rounds", "steps", "rank", "batch_size", "inversion_steps", "num_tokens", "samples_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps < self.rounds:
            raise ValueError(f"steps ({self.steps}) must be at least rounds ({self.rounds}): each round trains")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.random_rows < 0:
            raise ValueError(f"random_rows must be 0 or more, got {self.random_rows}")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"each template needs exactly one {{}} where the attack's tokens go, got {bad}")


Conditioning = tuple[torch.Tensor, torch.Tensor | None]  # (context (N, T, D), pooled (N, W) or None)


@dataclass
class ConceptData:
    """One concept's side of the training: its images, and pairs of a context they must not
    draw it under (growing each round) with the anchor's in the same phrasing, which they
    should denoise as."""

    concept: Concept
    latents: torch.Tensor
    pairs: list[tuple[Conditioning, Conditioning]]


@dataclass
class HardenResult:
    patch: ForgetPatch
    losses: list[float]
    attack_losses: list[float]  # each round's inversion, last steps' mean: the attack's fit


def check_hardenable(patch: ForgetPatch) -> None:
    """Only a patch of the UNet can be hardened, and only once."""
    mode = patch.metadata.get("fmn.mode")
    if mode == HARDEN_MODE:
        raise ValueError("this is already a hardening patch: connect the forget patch it hardens (Forget Train's or "
                         "Load Forget Patch's output)")
    if patch.gated:
        raise ValueError("a gated patch (mode 'gated k') leaves every prompt without the concept's words as it was, "
                         "which is the way an attack comes back, so hardening it is not supported: harden a patch of "
                         "the default mode (aimed k/v)")
    if patch.text_modules():
        raise ValueError("a 'token rows' patch edits the text encoder and leaves the UNet as it was, so there is "
                         "nothing in the UNet to harden: train the concept with another mode (the default aimed k/v)")
    if not patch.concepts:
        raise ValueError("the patch names no concepts (fmn.concepts): harden a patch made by Forget Train")


def patch_digest(patch: ForgetPatch) -> str:
    """A short digest of a patch's weights: a hardening patch names the patch it hardens.
    Taken in kohya's naming, so a patch has one digest in memory and in its file."""
    lora = kohya_named(patch).lora
    digest = hashlib.sha256()
    for key in sorted(lora):
        digest.update(key.encode())
        digest.update(lora[key].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def harden(patcher, clip, patch: ForgetPatch, latents: torch.Tensor | None, config: HardenConfig,
           progress=None) -> HardenResult:
    """Train a hardening patch for `patch` on `patcher` (the unpatched model); the inputs are
    untouched. `latents`: the concept's images in the model's space, for a one-concept
    patch; None samples them from `patcher`, which still knows every concept."""
    config.validate()
    check_hardenable(patch)
    concepts = concepts_of(patch)
    if latents is not None and len(concepts) > 1:
        raise ValueError(f"the patch forgets {len(concepts)} concepts and images can show only one: leave the images "
                         "unconnected (each concept's are then sampled from the model), or harden one-concept patches")
    patched = apply_patch(patcher, patch, 1.0)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.inference_mode(False):
        data = [_concept_data(patcher, clip, c, latents, config, progress) for c in concepts]
        shape = tuple(data[0].latents.shape[1:])
        kept = _kept_data(patched, clip, config, shape, progress)
        deltas = _deltas(patched, config.rank, generator)
        losses, attack_losses = [], []
        per_round = [config.steps // config.rounds + (r < config.steps % config.rounds) for r in range(config.rounds)]
        for r, steps in enumerate(per_round):
            for d in data:
                attack_losses.append(_attack(patched, clip, deltas, d, config, r, generator, progress))
            losses += _train(patched, deltas, data, kept, steps, config, generator, progress)
    lora = export_kohya(deltas)
    check_finite_tensors(lora, "Harden Forget Patch")
    hardening = kohya_named(ForgetPatch(lora, _metadata(patcher, patch, concepts, config, losses)))
    return HardenResult(hardening, losses, attack_losses)


def progress_total(config: HardenConfig, n_concepts: int, images_given: bool) -> int:
    """Progress steps of a run: every sample drawn, inversion step and training step."""
    samples = len(kept_prompts(config)) * config.samples_per_prompt + (0 if images_given else n_concepts * SELF_SAMPLES)
    return samples + config.steps + config.rounds * n_concepts * config.inversion_steps


def kept_prompts(config: HardenConfig) -> list[str]:
    """The prompts whose samples must denoise as before: the preserve set and the keep list's."""
    return preserve_prompts() + keep_prompts(config.keep)


def _concept_data(original, clip, concept: Concept, latents: torch.Tensor | None, config: HardenConfig,
                  progress) -> ConceptData:
    """The concept's pictures (sampled from the original model when none are given) and its
    own prompts and the attack's templates with the concept's words, each paired with the
    same phrasing around the anchor."""
    templates = tuple(dict.fromkeys(concept.templates + config.templates))
    pairs = [(host.encode_pooled(clip, t.format(concept.text)), host.encode_pooled(clip, _with_anchor(t, concept)))
             for t in templates]
    own = [student for student, _ in pairs[:len(concept.templates)]]
    if latents is None:
        size = config.resolution // 8
        shape = (original.model.diffusion_model.in_channels, size, size)
        empty = host.encode_pooled(clip, "")
        picks = [own[i % len(own)] for i in range(SELF_SAMPLES)]
        latents = _sampled(original, picks, empty, [config.seed + i for i in range(SELF_SAMPLES)], shape, progress)
    return ConceptData(concept, latents.float().detach().clone(), pairs)


def _with_anchor(template: str, concept: Concept) -> str:
    return filled(template, concept.anchor)


def _kept_data(patched, clip, config: HardenConfig, shape: tuple[int, ...],
               progress) -> tuple[torch.Tensor, list[Conditioning]]:
    """The patched model's own samples of the preserve and kept prompts, with each one's
    conditioning: what must denoise as before."""
    empty = host.encode_pooled(clip, "")
    seeds = [config.seed + 1000 + i for i in range(config.samples_per_prompt)]
    encoded = [host.encode_pooled(clip, prompt) for prompt in kept_prompts(config)]
    conditions = [c for c in encoded for _ in seeds]
    latents = _sampled(patched, conditions, empty, seeds * len(encoded), shape, progress)
    return latents.float(), conditions


def _sampled(patcher, conditions: list[Conditioning], empty: Conditioning, seeds: list[int],
             shape: tuple[int, ...], progress) -> torch.Tensor:
    """`patcher`'s sample of each conditioning on its seed, in the model's space; one
    progress step per sample. Many go through the sampler at once, as many as
    SAMPLE_POSITIONS allows: on a small latent it is the sampler's cost per call, not the
    UNet's work, that one prompt at a time pays (half of a ToyBench run, measured)."""
    per_call = max(1, SAMPLE_POSITIONS // math.prod(shape[1:]))
    out = []
    for start in range(0, len(conditions), per_call):
        rows = conditions[start:start + per_call]
        samples = host.sample(patcher, _stacked(rows), empty, seeds[start:start + per_call], shape)
        out.append(host.process_latent_in(patcher, samples))
        if progress is not None:
            for _ in rows:
                progress.step()
    return torch.cat(out)


def _deltas(patcher, rank: int, generator: torch.Generator) -> dict[str, LowRankDelta]:
    """An ordinary LoRA on every linear weight of the UNet's transformer blocks."""
    keys = [f"{name}.weight" for name, module in patcher.model.named_modules()
            if isinstance(module, torch.nn.Linear) and f".{LAYER}." in name]
    device = host.device()
    return {key: LowRankDelta.free(out_features, in_features, min(rank, out_features, in_features), 1.0,
                                   generator).to(device)
            for key, (out_features, in_features) in host.weight_shapes(patcher, keys).items()}


def _attack(patched, clip, deltas: dict[str, LowRankDelta], data: ConceptData, config: HardenConfig, round_: int,
            generator: torch.Generator, progress) -> float:
    """Invert a slice of the concept's images through the model as hardened so far and add
    the found rows, and random rows of their size, to its contexts; returns the attack's
    final loss."""
    template = config.attack_template(data.concept, round_)
    attacked = host.apply_lora(patched, export_kohya(deltas, torch.float32), 1.0)
    n = len(data.latents)
    picks = torch.arange(round_ * IMAGES_PER_INVERSION, (round_ + 1) * IMAGES_PER_INVERSION) % n
    inversion = InversionConfig(num_tokens=config.num_tokens, steps=config.inversion_steps,
                                learning_rate=INVERSION_LEARNING_RATE, seed=config.seed + round_, templates=(template,))
    found = invert(attacked, clip, data.latents[picks.unique()], INIT_WORDS.get(data.concept.category, INIT_FALLBACK),
                   inversion, progress)
    rows = found.vectors.detach()
    scale = rows.norm(dim=-1).mean() / math.sqrt(rows.shape[-1])
    anchor = host.encode_pooled(clip, _with_anchor(template, data.concept))
    with torch.no_grad():
        encoder = TextEncoders(host.text_encoder_specs(clip))
        prompts = Prompts(clip, (template,))
        data.pairs.append((prompts.encode(encoder, rows, [0]), anchor))
        for _ in range(config.random_rows):
            data.pairs.append((prompts.encode(encoder, torch.randn(rows.shape, generator=generator) * scale, [0]), anchor))
    tail = found.losses[-10:]
    return sum(tail) / len(tail)


def _train(patched, deltas: dict[str, LowRankDelta], data: list[ConceptData],
           kept: tuple[torch.Tensor, list[Conditioning]], steps: int, config: HardenConfig,
           generator: torch.Generator, progress) -> list[float]:
    params = [p for d in deltas.values() for p in d.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.learning_rate)
    sampling = host.model_sampling(patched)
    device = host.device()
    losses = []
    try:
        with host.trainable_unet(patched.clone(), deltas) as unet:
            for step in range(steps):
                concept = data[step % len(data)]
                forget = _forget_batch(concept, config.batch_size, sampling, generator)
                keep = _kept_batch(kept, config.batch_size, sampling, generator)
                loss = _distillation(unet, deltas, forget, device) + _distillation(unet, deltas, keep, device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if not torch.isfinite(loss):
                    raise RuntimeError(f"hardening diverged at step {len(losses) + 1}: lower learning_rate")
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress.step()
    finally:
        for p in params:
            p.requires_grad_(False)
    return losses


Batch = tuple[torch.Tensor, torch.Tensor, Conditioning, Conditioning]  # x, sigma, student's and teacher's conditioning


def _forget_batch(data: ConceptData, n: int, sampling, generator: torch.Generator) -> Batch:
    """The concept's images under its contexts; the teacher reads each one's anchor."""
    x, sigma, _ = _noised(data.latents, n, sampling, generator)
    picks = torch.randint(len(data.pairs), (n,), generator=generator).tolist()
    return x, sigma, _stacked([data.pairs[i][0] for i in picks]), _stacked([data.pairs[i][1] for i in picks])


def _kept_batch(kept: tuple[torch.Tensor, list[Conditioning]], n: int, sampling, generator: torch.Generator) -> Batch:
    """Samples of the kept prompts under their own prompt, for both."""
    latents, conditions = kept
    x, sigma, picks = _noised(latents, n, sampling, generator)
    cond = _stacked([conditions[i] for i in picks.tolist()])
    return x, sigma, cond, cond


def _noised(latents: torch.Tensor, n: int, sampling,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` of `latents` drawn at random and noised; and which ones were drawn."""
    picks = torch.randint(len(latents), (n,), generator=generator)
    x, sigma, _ = noisy(sampling, latents[picks], generator)
    return x, sigma, picks


def _stacked(conditions: list[Conditioning]) -> Conditioning:
    contexts = torch.cat([c for c, _ in conditions])
    pooled = None if any(p is None for _, p in conditions) else torch.cat([p for _, p in conditions])
    return contexts, pooled


def _distillation(unet, deltas: dict[str, LowRankDelta], batch: Batch, device: torch.device) -> torch.Tensor:
    """Mean squared difference of the hardened model's noise prediction under the student's
    conditioning and the patched model's under the teacher's."""
    x, sigma, (context, pooled), (teacher_context, teacher_pooled) = batch
    x, sigma = x.to(device), sigma.to(device)

    def to(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    scale = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    with torch.no_grad(), disabled(deltas):
        teacher = unet(x, sigma, to(teacher_context), to(teacher_pooled))
    student = unet(x, sigma, to(context), to(pooled))
    return ((student - teacher) / scale).float().pow(2).mean()


def _metadata(patcher, patch: ForgetPatch, concepts: list[Concept], config: HardenConfig,
              losses: list[float]) -> dict[str, str]:
    from . import __version__

    arch = host.model_arch(patcher)
    texts = [c.text for c in concepts]
    inherited = {k: patch.metadata[k] for k in ("fmn.base_fingerprint", "fmn.context_dim", "fmn.anchors")
                 if k in patch.metadata}
    return {
        **model_card(arch, texts, [c.category for c in concepts], config.steps, HARDEN_MODE),
        "modelspec.title": "Harden the forgetting of " + ", ".join(texts),
        **inherited,
        **check_report.carried([patch.metadata]),  # the forget run's own measurement: what this patch hardens
        "fmn.format": "forget-me-not/1",
        "fmn.pack_version": __version__,
        "fmn.concepts": json.dumps(texts),
        "fmn.categories": json.dumps([c.category for c in concepts]),
        "fmn.keep": json.dumps(list(config.keep)),
        "fmn.base_arch": arch,
        "fmn.mode": HARDEN_MODE,
        "fmn.hardens": patch_digest(patch),
        "fmn.rank": str(config.rank),
        "fmn.rounds": str(config.rounds),
        "fmn.steps": str(config.steps),
        "fmn.learning_rate": repr(config.learning_rate),
        "fmn.seed": str(config.seed),
        "fmn.losses": json.dumps([round(x, 6) for x in losses]),
        "fmn.final_loss": repr(round(losses[-1], 6)) if losses else "nan",
    }
