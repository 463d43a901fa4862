"""A gate on the cross-attention context, and the edit of the key input it lets through.

A LoRA on the cross-attention keys is linear in the word: it moves every word whose
context vector it does not annul, and a method cannot annul words it never saw (in a
random-weight text encoder each such word is a new random direction; docs/method.md, "How it
aims"). A gate is not linear in the word. It compares each context vector with the
concept's own token vectors (cosine) and opens only where they are alike, so a prompt
without the concept reaches the UNet exactly as it was, and only there does the edit act.

The edit is a low-rank change of each cross-attention layer's key input, installed with
the host's attn2 patch (which lets the key input differ from the value input). With
`whole_prompt`, a prompt where the gate opens anywhere is edited at every token: the start
token and the other words can then take the attention the concept loses, which the
concept's tokens alone cannot give away (scripts/bench_attention_bound.py measures both).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import host

GATE_MARGIN = 0.05  # the gate shuts this far above the most concept-like token of the prompts without it
# In a patch file: the gate's token vectors, each layer's edit, and the gate's thresholds.
CENTROIDS_KEY = "fmn_gate.centroids"
EDIT_SUFFIXES = (".fmn_key_input.down", ".fmn_key_input.up")
SHUT_FIELD, OPEN_FIELD, WHOLE_PROMPT_FIELD = "fmn.gate_shut", "fmn.gate_open", "fmn.gate_whole_prompt"


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass
class ConceptGate:
    """0 on context vectors no more like the concept's tokens than `shut`, 1 from `open` up,
    linear between; (B, T, 1) per context (B, T, D)."""

    centroids: torch.Tensor  # (N, D): the concept's token vectors, unit length
    shut: float
    open: float
    whole_prompt: bool = True

    @classmethod
    def fit(cls, concept_rows: list[torch.Tensor], other_contexts: list[torch.Tensor], whole_prompt: bool = True,
            margin: float = GATE_MARGIN) -> ConceptGate:
        """A gate from the concept's token vectors in each of its prompts (`concept_rows`,
        one (n, D) per prompt) and the whole contexts of prompts without it (each (T, D):
        start token, words, end and padding). It opens at the least similarity of a prompt's
        concept tokens to those of the other prompts, so a new phrasing of the concept still
        opens it; it shuts `margin` above the most concept-like token of the others."""
        if len(concept_rows) < 2:
            raise ValueError("a concept gate needs the concept in at least two prompts (its templates) to tell how "
                             "alike its tokens stay across phrasings")
        rows = [_unit(r) for r in concept_rows]
        centroids = torch.cat(rows)
        shut = max(float(cls._similarity(centroids, c).max()) for c in other_contexts) + margin
        open_ = min(float((r @ torch.cat(rows[:i] + rows[i + 1:]).T).max(-1).values.min()) for i, r in enumerate(rows))
        if shut >= open_:
            raise ValueError(f"the concept's tokens are no more like each other across its prompts ({open_:.3f}) than "
                             f"like the tokens of prompts without it ({shut:.3f}, margin included): no gate separates "
                             "them; name the concept by words the other prompts do not use, or train without the gate")
        return cls(centroids, shut, open_, whole_prompt)

    @staticmethod
    def _similarity(centroids: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return (_unit(context) @ centroids.to(context.device).T).max(-1).values

    def similarity(self, context: torch.Tensor) -> torch.Tensor:
        """Each context vector's largest cosine to the concept's tokens: (..., T)."""
        return self._similarity(self.centroids, context)

    def __call__(self, context: torch.Tensor) -> torch.Tensor:
        gate = ((self.similarity(context) - self.shut) / (self.open - self.shut)).clamp(0, 1)
        if self.whole_prompt:
            gate = gate.amax(dim=-1, keepdim=True).expand_as(gate)
        return gate.unsqueeze(-1).to(context.dtype)


class KeyInputEdit(torch.nn.Module):
    """One layer's low-rank change of its key input, `context @ down.T @ up.T`: starts at
    zero (`up` is zero), so the first step starts from the original model. `enabled` off
    gives the original model (the training's teacher) without a second copy."""

    def __init__(self, width: int, rank: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.down = torch.nn.Parameter(torch.randn(rank, width, generator=generator) * width ** -0.5)
        self.up = torch.nn.Parameter(torch.zeros(width, rank))
        self.enabled = True

    @classmethod
    def of(cls, down: torch.Tensor, up: torch.Tensor, strength: float = 1.0) -> KeyInputEdit:
        """An edit with these factors (a loaded patch's), scaled by `strength`."""
        edit = cls(down.shape[1], down.shape[0])
        with torch.no_grad():
            edit.down.copy_(down.float())
            edit.up.copy_(up.float() * strength)
        return edit.requires_grad_(False)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return (context @ self.down.to(context).T) @ self.up.to(context).T


def key_input_edits(layers: list[host.Attn2Layer], rank: int, generator: torch.Generator) -> dict[str, KeyInputEdit]:
    """A zero edit per cross-attention layer, keyed by the layer's module name."""
    return {layer.module: KeyInputEdit(layer.context_dim, rank, generator) for layer in layers}


def gated_key_patch(layers: list[host.Attn2Layer], edits: dict[str, KeyInputEdit], gate: ConceptGate) -> Callable:
    """The host's attn2 patch: each layer's key input plus its gated edit, the value input as
    it was. Register it with `patcher.set_model_attn2_patch` on a clone."""
    by_block = {layer.block: layer.module for layer in layers}

    def patch(n, context, value, extra_options):
        block = extra_options["block"]
        edit = edits[by_block[block[0], block[1], extra_options["block_index"]]]
        if not edit.enabled:
            return n, context, value
        return n, context + gate(context) * edit(context), value

    return patch


def to_file(edits: dict[str, KeyInputEdit], gate: ConceptGate) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header fields of a gated patch file (fp32: the gate compares
    directions closely, and the edits are small)."""
    tensors = {CENTROIDS_KEY: gate.centroids.float().cpu().contiguous()}
    for module, edit in edits.items():
        for suffix, factor in zip(EDIT_SUFFIXES, (edit.down, edit.up)):
            tensors[module + suffix] = factor.detach().float().cpu().contiguous()
    fields = {SHUT_FIELD: repr(gate.shut), OPEN_FIELD: repr(gate.open), WHOLE_PROMPT_FIELD: str(gate.whole_prompt).lower()}
    return tensors, fields


def is_gated(tensors: dict[str, torch.Tensor]) -> bool:
    return CENTROIDS_KEY in tensors


def edit_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k[: -len(s)] for k in tensors for s in EDIT_SUFFIXES if k.endswith(s)})


def file_problems(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[str]:
    """What is wrong with a gated patch on its own (keys, shapes, thresholds)."""
    problems = []
    centroids = tensors[CENTROIDS_KEY]
    unknown = [k for k in tensors if k != CENTROIDS_KEY and not k.endswith(EDIT_SUFFIXES)]
    if unknown:
        problems.append(f"unexpected keys {unknown[:3]} in a gated patch")
    if centroids.ndim != 2 or not len(centroids):
        problems.append(f"{CENTROIDS_KEY} is {tuple(centroids.shape)}, not (tokens, width)")
    modules = edit_modules(tensors)
    if not modules:
        problems.append("it holds no key-input edits")
    for module in modules:
        down, up = (tensors.get(module + s) for s in EDIT_SUFFIXES)
        if down is None or up is None:
            problems.append(f"{module} lacks its key-input down or up factor")
        elif down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1] or down.shape[1] != up.shape[0] \
                or centroids.ndim == 2 and down.shape[1] != centroids.shape[1]:
            problems.append(f"{module}: key-input factors {tuple(down.shape)} and {tuple(up.shape)} do not fit "
                            f"the gate's width {centroids.shape[-1]}")
    try:
        shut, open_ = float(metadata[SHUT_FIELD]), float(metadata[OPEN_FIELD])
        if not shut < open_:
            problems.append(f"gate thresholds {SHUT_FIELD} {shut} and {OPEN_FIELD} {open_} are not in order")
    except (KeyError, ValueError):
        problems.append(f"metadata {SHUT_FIELD} and {OPEN_FIELD} must hold the gate's thresholds")
    return problems


def fit_problems(tensors: dict[str, torch.Tensor], layers: list[host.Attn2Layer]) -> list[str]:
    """What does not match between a gated patch and the model's cross-attention layers."""
    widths = {layer.module: layer.context_dim for layer in layers}
    modules = edit_modules(tensors)
    problems = [f"the model has no cross-attention layer {m}" for m in modules if m not in widths]
    width = tensors[CENTROIDS_KEY].shape[-1]
    problems += [f"{m}: the gate is for a text context {width} wide, the model's is {widths[m]}"
                 for m in modules if m in widths and widths[m] != width]
    missing = [m for m in widths if m not in modules]
    return problems + ([f"it has no edit for {len(missing)} of the model's cross-attention layers (e.g. {missing[0]})"]
                       if missing else [])


def applied(patcher, tensors: dict[str, torch.Tensor], metadata: dict[str, str], strength: float):
    """A clone of `patcher` with the gated edit installed as the host's attn2 patch; it
    stacks with LoRAs and with other gated patches (each attn2 patch sees the key input
    the ones before it left). Its tensors are made outside inference mode (in which the
    host runs nodes and loads files): what learns through the patched model (Concept
    Inversion, Recovery Attack) takes gradients through them."""
    layers = host.attn2_layers(patcher)
    with torch.inference_mode(False):
        gate = ConceptGate(tensors[CENTROIDS_KEY].float().clone(), float(metadata[SHUT_FIELD]),
                           float(metadata[OPEN_FIELD]), metadata.get(WHOLE_PROMPT_FIELD, "true") == "true")
        edits = {m: KeyInputEdit.of(tensors[m + EDIT_SUFFIXES[0]], tensors[m + EDIT_SUFFIXES[1]], strength)
                 for m in edit_modules(tensors)}
    clone = patcher.clone()
    clone.set_model_attn2_patch(gated_key_patch(layers, edits, gate))
    return clone
