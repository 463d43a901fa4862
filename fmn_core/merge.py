"""Fuse several forget patches into one by least squares, not by adding them.

Added together, every patch also acts on the other patches' concepts: where the contexts
of "star" and "ring" overlap, the star patch moves ring's keys too, and the sum over- or
undershoots on both. For each projection that reads the text (attn2 `to_k`, `to_v`) the
fused update instead solves MACE's fusion problem

    min_dW  sum_i |(dW - dW_i) C_i^T|^2  +  preserve_weight * |dW P^T|^2

where C_i holds the context rows of patch i's concepts (their tokens in the category
templates, and their copies in later tokens: what the patch was aimed at) and P the
preserve prompts' and kept concepts' rows. With second moments M the closed form is

    dW = (sum_i dW_i M_i) (sum_i M_i + preserve_weight * M_P)^-1.

Projections that read the image (`to_q`, `to_out`, in reference-recipe patches) cannot be
fitted on text, so they are added. A text-encoder side ('token rows' patches: changes of
their words' rows in the token table) is added exactly, by stacking the factors. The
fused update is factored by SVD at the smallest rank that keeps all but `tolerance` of its
energy, one rank for all layers: patches whose concepts share directions share rank, so
the file grows less than the sum of its inputs.
"""
from __future__ import annotations

import json

import torch

from . import aim, check_report, host
from .concepts import ANCHORS, TEMPLATES, Concept, keep_prompts
from .patch import HARDEN_MODE, ForgetPatch, kohya_named, model_card, structure_problems
from .examples import anchor_moment, build_examples, preserve_moment

TEXT_PROJECTIONS = ("attn2_to_k", "attn2_to_v")
# A custom template is not stored in the patch; its concept is fitted in these instead.
FALLBACK_TEMPLATES = ("a photo of {}", "{}")


def check_mergeable(patches: list[ForgetPatch]) -> None:
    """Refuse, before any work, patches that cannot be fused: fewer than two, broken, or
    made for different model families or context widths."""
    if len(patches) < 2:
        raise ValueError("merging needs at least two forget patches: connect patch_2")
    for i, patch in enumerate(patches, 1):
        problems = structure_problems(patch)
        if problems:
            raise ValueError(f"patch {i} is not a valid forget patch: " + "; ".join(problems[:3]))
        if patch.gated:
            raise ValueError(f"patch {i} is a gated patch (mode 'gated k'), whose edit acts behind its own gate and "
                             "cannot be fused into a LoRA: apply it after the merged patch with another Apply Forget "
                             "Patch (patches stack)")
        if patch.metadata.get("fmn.mode") == HARDEN_MODE:
            raise ValueError(f"patch {i} is a hardening patch (Harden Forget Patch), which holds no concept's edit to "
                             "fuse: merge the forget patches, then harden the merged patch")
    for field, what in (("fmn.base_arch", "model family"), ("fmn.context_dim", "text context width")):
        values = [p.metadata.get(field) for p in patches]
        if len(set(values)) > 1:
            listed = ", ".join(f"patch {i}: {v or 'unknown'}" for i, v in enumerate(values, 1))
            raise ValueError(f"these patches were made for different base models ({what}: {listed}); "
                             "merge only patches trained on one model family")


def concepts_of(patch: ForgetPatch) -> list[Concept]:
    """The patch's concepts rebuilt from its header (text, category, anchor)."""
    meta = patch.metadata
    texts = patch.concepts
    categories = json.loads(meta.get("fmn.categories", "[]")) or ["object"] * len(texts)
    anchors = json.loads(meta.get("fmn.anchors", "null")) or [ANCHORS.get(c, "") for c in categories]
    return [Concept(t, c, TEMPLATES.get(c, FALLBACK_TEMPLATES), None, a) for t, c, a in zip(texts, categories, anchors)]


def _moments(clip, patch: ForgetPatch) -> tuple[aim.SecondMoment, aim.SecondMoment]:
    """(second moment of the concepts' rows, of their prompts' anchors and kept concepts)."""
    keep = tuple(json.loads(patch.metadata.get("fmn.keep", "[]")))
    examples = build_examples(clip, concepts_of(patch), False)
    concept, own = aim.SecondMoment(examples[0].context.shape[-1]), anchor_moment(examples)
    for e in examples:
        concept.add(torch.cat([e.context[0][e.mask > 0], e.copies]))
    for prompt in keep_prompts(keep):
        own.add(host.encode(clip, prompt)[0])
    return concept, own


def _delta(patch: ForgetPatch, module: str) -> torch.Tensor | None:
    """up @ down * alpha / rank, as the host's LoRA loader applies it at strength 1."""
    up = patch.lora.get(f"{module}.lora_up.weight")
    if up is None:
        return None
    down = patch.lora[f"{module}.lora_down.weight"]
    alpha = patch.lora.get(f"{module}.alpha")
    scale = 1.0 if alpha is None else float(alpha) / up.shape[1]
    return up.double() @ down.double() * scale


def _fit(deltas: list[torch.Tensor | None], moments: list[torch.Tensor], system: torch.Tensor) -> torch.Tensor:
    target = sum(d @ m for d, m in zip(deltas, moments) if d is not None)
    return torch.linalg.solve(system, target.T).T  # system is symmetric


def _rank_for(singular: torch.Tensor, tolerance: float) -> int:
    energy = singular.square().cumsum(0)
    return int((energy < (1 - tolerance) * energy[-1]).sum()) + 1


# How firmly the fusion holds ordinary prompts. ToyBench, single patches trained with the
# defaults (negative guidance 0.5), fused H against one run over the same concepts: at 1,
# objects 0.862 (88 %) and all but two 0.629 (68 %); at 4, 0.877 and 0.755; at 16, 0.924
# and 0.876. Each single patch moves the other concepts a little, and summed over ten that
# is what the preserve term has to hold.
PRESERVE_WEIGHT = 16.0


def merge_patches(clip, patches: list[ForgetPatch], preserve_weight: float = PRESERVE_WEIGHT, tolerance: float = 1e-3,
                  ridge: float = 1e-3) -> ForgetPatch:
    """One patch that acts on each input patch's concepts as that patch does (see module).
    Its modules are named as kohya's sd-scripts names them, whichever naming the inputs use."""
    check_mergeable(patches)
    patches = [kohya_named(p) for p in patches]
    if preserve_weight < 0 or not 0 <= tolerance < 1:
        raise ValueError(f"preserve_weight must be 0 or more and tolerance in [0, 1), got {preserve_weight}, {tolerance}")
    moments = [_moments(clip, p) for p in patches]
    preserve = preserve_moment(clip)
    for _, own in moments:
        preserve = preserve.merged(own)
    concept = [m.matrix() for m, _ in moments]
    system = aim.ridged(sum(concept) + preserve_weight * preserve.matrix(), ridge)
    modules = sorted({m for p in patches for m in p.unet_modules()})
    fused = {}
    for module in modules:
        deltas = [_delta(p, module) for p in patches]
        if module.endswith(TEXT_PROJECTIONS):
            fused[module] = _fit(deltas, concept, system)
        else:
            fused[module] = sum(d for d in deltas if d is not None)
    factors = {m: torch.linalg.svd(d, full_matrices=False) for m, d in fused.items()}
    rank = max((_rank_for(s, tolerance) for _, s, _ in factors.values()), default=0)
    lora = stacked_text_sides(patches)
    for module, (u, s, vh) in factors.items():
        r = min(rank, len(s))
        lora[f"{module}.lora_up.weight"] = (u[:, :r] * s[:r]).to(torch.float16).contiguous()
        lora[f"{module}.lora_down.weight"] = vh[:r].to(torch.float16).contiguous()
        lora[f"{module}.alpha"] = torch.tensor(float(r))
    return ForgetPatch(lora, merged_metadata(patches, rank, preserve_weight, tolerance))


def stacked_text_sides(patches: list[ForgetPatch]) -> dict[str, torch.Tensor]:
    """The patches' text-encoder LoRAs as one: up and down factors stacked along the rank,
    each scaled by its alpha / rank, so the sum of the edits is exact."""
    lora = {}
    for module in sorted({m for p in patches for m in p.text_modules()}):
        ups, downs = [], []
        for p in (p for p in patches if module in p.text_modules()):
            up, down = p.lora[f"{module}.lora_up.weight"], p.lora[f"{module}.lora_down.weight"]
            alpha = p.lora.get(f"{module}.alpha")
            ups.append(up.float() * (1.0 if alpha is None else float(alpha) / up.shape[1]))
            downs.append(down.float())
        lora[f"{module}.lora_up.weight"] = torch.cat(ups, dim=1).to(torch.float16).contiguous()
        lora[f"{module}.lora_down.weight"] = torch.cat(downs).to(torch.float16).contiguous()
        lora[f"{module}.alpha"] = torch.tensor(float(sum(u.shape[1] for u in ups)))
    return lora


def merged_metadata(patches: list[ForgetPatch], rank: int, preserve_weight: float, tolerance: float) -> dict[str, str]:
    """The first patch's header for the base model, every patch's concepts, and the merge."""
    concepts = [c for p in patches for c in concepts_of(p)]
    keep = list(dict.fromkeys(k for p in patches for k in json.loads(p.metadata.get("fmn.keep", "[]"))))
    first = patches[0].metadata
    base = {k: first[k] for k in ("fmn.format", "fmn.pack_version", "fmn.base_arch", "fmn.base_fingerprint",
                                  "fmn.context_dim") if k in first}
    card = model_card(first.get("fmn.base_arch", "unknown"), [c.text for c in concepts], [c.category for c in concepts],
                      0, "merged", any(p.text_modules() for p in patches))
    card["modelspec.description"] = (f"Forget-Me-Not patch: the model forgets {', '.join(c.text for c in concepts)}. "
                                     f"Merged from {len(patches)} patches by least squares.")
    sources = [{"concepts": p.concepts, "rank": p.metadata.get("fmn.rank"), "mode": p.metadata.get("fmn.mode")}
               for p in patches]
    return {
        **base,
        "fmn.concepts": json.dumps([c.text for c in concepts]),
        "fmn.categories": json.dumps([c.category for c in concepts]),
        "fmn.anchors": json.dumps([c.anchor for c in concepts]),
        "fmn.keep": json.dumps(keep),
        "fmn.mode": "merged",
        "fmn.rank": str(rank),
        "fmn.merged_from": json.dumps(sources),
        "fmn.merge": json.dumps({"preserve_weight": preserve_weight, "tolerance": tolerance}),
        **check_report.carried([p.metadata for p in patches]),  # each source run's own measurement
        **card,
    }
