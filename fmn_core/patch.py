"""Forget patches: a kohya-format LoRA safetensors file plus Forget-Me-Not metadata.

The file loads unchanged through the host's stock `LoraLoaderModelOnly`; applying it
here goes through the same host function, so both yield the same weights. Files name their
modules as kohya's sd-scripts does for their architecture, with its header fields beside
the pack's (`kohya.py`), so diffusers' and A1111's loaders read them too; the pack reads
both that naming and the host's, which earlier versions wrote. Loading never unpickles: the
header is checked by hand before safetensors reads tensors (`safetensors_check.py`).
"""
from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import gate, host, kohya
from .files import atomic_write
from .lora import FULL_RANK, is_text_module
from .safetensors_check import load_checked

SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha")
STRENGTH_RANGE = (-10.0, 10.0)
LIST_FIELDS = ("fmn.concepts", "fmn.categories", "fmn.anchors")
# The host's model config class -> the modelspec architecture id LoRA tools display.
MODELSPEC_ARCH = {"SD15": "stable-diffusion-v1", "SD20": "stable-diffusion-v2", "SD21UnclipL": "stable-diffusion-v2",
                  "SD21UnclipH": "stable-diffusion-v2", "SDXL": "stable-diffusion-xl-v1-base"}
COVER_SIZE = 256  # longest side of the cover image kept in the header, in pixels
HARDEN_MODE = "harden"  # the fmn.mode of a patch from Harden Forget Patch, applied after the patch it hardens


@dataclass
class ForgetPatch:
    lora: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def concepts(self) -> list[str]:
        return json.loads(self.metadata.get("fmn.concepts", "[]"))

    @property
    def base_arch(self) -> str | None:
        return self.metadata.get("fmn.base_arch")

    @property
    def gated(self) -> bool:
        """A gated edit of the key input (mode 'gated k', gate.py), not a LoRA."""
        return gate.is_gated(self.lora)

    def modules(self) -> list[str]:
        return sorted({k[: -len(s)] for k in self.lora for s in SUFFIXES if k.endswith(s)})

    def text_modules(self) -> list[str]:
        """Modules of the text encoder (a 'token rows' patch edits its token table)."""
        return [m for m in self.modules() if is_text_module(m)]

    def unet_modules(self) -> list[str]:
        return [m for m in self.modules() if not is_text_module(m)]

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.lora.values())


USAGE_MODEL = ("Apply to the MODEL only (Apply Forget Patch or LoraLoaderModelOnly) at strength 1; "
               "lower strength forgets less.")
USAGE_GATED = ("Apply with Apply Forget Patch (Forget-Me-Not) at strength 1: a gated edit of the key input, not a "
               "LoRA, so LoRA loaders do not apply it.")
USAGE_CLIP = ("Apply to the CLIP (Apply Forget Patch with its clip input, or LoraLoader): it edits the text encoder's "
              "rows of the concept's words; strength 1, lower strength forgets less.")


def model_card(arch: str, concepts: list[str], categories: list[str], steps: int, mode: str,
               edits_text: bool = False, gated: bool = False, measured: str = "") -> dict[str, str]:
    """The `modelspec.*` header fields that ComfyUI's Model Library (and other LoRA tools)
    show for a file, so a patch says what it does without being opened; `measured`, the
    run's own verdict on itself (check_report.verdict), ends the description."""
    named = ", ".join(f"{c} ({k})" for c, k in zip(concepts, categories))
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{MODELSPEC_ARCH.get(arch, arch)}/{'forget-me-not-gated' if gated else 'lora'}",
        "modelspec.title": "Forget " + ", ".join(concepts),
        "modelspec.description": f"Forget-Me-Not patch: the model forgets {named}. Trained {steps} steps, mode {mode}."
                                 + (f" Measured on its own model: {measured}." if measured else ""),
        "modelspec.usage_hint": USAGE_CLIP if edits_text else USAGE_GATED if gated else USAGE_MODEL,
        "modelspec.tags": ", ".join(["forget-me-not", "concept erasure", *concepts]),
    }


def with_cover(patch: ForgetPatch, image: torch.Tensor) -> ForgetPatch:
    """The patch with `image` (the first of an IMAGE batch, shrunk to COVER_SIZE) as its
    Model Library cover: a PNG data URL in `modelspec.thumbnail`."""
    from PIL import Image

    pixels = (image[0].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    picture = Image.fromarray(pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., 0])
    picture.thumbnail((COVER_SIZE, COVER_SIZE))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    thumbnail = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return replace(patch, metadata={**patch.metadata, "modelspec.thumbnail": thumbnail})


def save_patch(patch: ForgetPatch, path: Path, overwrite: bool = False) -> Path:
    """Write the patch as `file_form` gives it."""
    written = file_form(patch)
    return atomic_write(Path(path), lambda tmp: save_file(written.lora, tmp, metadata=written.metadata), overwrite)


def kohya_named(patch: ForgetPatch) -> ForgetPatch:
    """The patch with its modules named as kohya's sd-scripts names them for the patch's
    architecture (`kohya.py`): the naming files are written in, and the one merge and
    harden work in, so patches of either naming meet there. Same tensors."""
    return replace(patch, lora=kohya.renamed(patch.lora, patch.base_arch))


def file_form(patch: ForgetPatch) -> ForgetPatch:
    """The patch as its file holds it: in kohya's naming, and with the kohya `ss_*` and
    `modelspec.implementation` fields that LoRA tools show beside the pack's header."""
    named = kohya_named(patch)
    return replace(named, metadata={**patch.metadata, **_tool_fields(named)})


def _tool_fields(patch: ForgetPatch) -> dict[str, str]:
    host_names = patch.gated or bool(patch.text_modules())
    implementation = kohya.implementation(patch.base_arch, host_names)
    ranks = [(patch.lora[f"{m}.lora_down.weight"].shape[0], _alpha(patch, m)) for m in patch.modules()]
    if patch.gated or not ranks:  # not a LoRA: only the pack applies it
        return {"modelspec.implementation": implementation}
    description = (patch.metadata.get("modelspec.description")
                   or f"Forget-Me-Not patch: the model forgets {', '.join(patch.concepts)}.")
    comment = f"{description} Made by Forget-Me-Not for ComfyUI, not by kohya's sd-scripts: its fmn.* fields say how."
    return kohya.header(ranks, patch.base_arch, comment, implementation)


def _alpha(patch: ForgetPatch, module: str) -> float:
    """A module's alpha; the host's loader takes a missing one as the rank (scale 1)."""
    alpha = patch.lora.get(f"{module}.alpha")
    return patch.lora[f"{module}.lora_down.weight"].shape[0] if alpha is None else float(alpha)


def load_patch(path: str | os.PathLike) -> ForgetPatch:
    """Read and validate a patch file; never unpickles."""
    patch = ForgetPatch(*load_checked(path, "forget patch"))
    problems = structure_problems(patch)
    if problems:
        raise ValueError(f"{os.path.basename(os.fspath(path))} is not a valid forget patch: " + "; ".join(problems))
    return patch


def structure_problems(patch: ForgetPatch) -> list[str]:
    """What is wrong with the patch on its own (keys, factor shapes, values)."""
    if patch.gated:
        return gate.file_problems(patch.lora, patch.metadata) + _finite_problems(patch) + metadata_problems(patch.metadata)
    problems = []
    unknown = [k for k in patch.lora if not k.endswith(SUFFIXES)]
    if unknown:
        problems.append(f"unexpected keys {unknown[:3]} (expected kohya LoRA keys ending in {', '.join(SUFFIXES)})")
    if not patch.modules():
        problems.append("it holds no LoRA weights")
    for module in patch.modules():
        up, down = patch.lora.get(f"{module}.lora_up.weight"), patch.lora.get(f"{module}.lora_down.weight")
        if up is None or down is None:
            problems.append(f"{module} lacks its lora_up or lora_down weight")
        elif up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            problems.append(f"{module}: lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)} disagree on rank")
        alpha = patch.lora.get(f"{module}.alpha")
        if alpha is not None and alpha.numel() != 1:
            problems.append(f"{module}.alpha holds {alpha.numel()} values, not one")
    return problems + _naming_problems(patch) + _finite_problems(patch) + metadata_problems(patch.metadata)


def _naming_problems(patch: ForgetPatch) -> list[str]:
    """One layer under both namings would be applied twice by a LoRA loader but fused into
    one by merge and save."""
    layers: dict[str, list[str]] = {}
    for module in patch.modules():
        layers.setdefault(kohya.module_name(module, patch.base_arch), []).append(module)
    return [f"{names[0]} and {names[1]} name the same layer: keep one of them"
            for names in layers.values() if len(names) > 1]


def _finite_problems(patch: ForgetPatch) -> list[str]:
    bad = [k for k, v in patch.lora.items() if not torch.isfinite(v.float()).all()]
    return [f"non-finite values in {bad[:3]}"] if bad else []


def metadata_problems(metadata: dict[str, str]) -> list[str]:
    """The header fields the pack reads back must hold what it wrote: JSON lists of strings."""
    problems = []
    for key in LIST_FIELDS:
        if key not in metadata:
            continue
        try:
            value = json.loads(metadata[key])
        except (json.JSONDecodeError, RecursionError):
            value = None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"metadata {key} is not a JSON list of strings")
    return problems


def rank_fits(rank: int, declared: int, shape) -> bool:
    """A layer carries the declared rank, or fewer when its own matrix holds fewer (a merged
    patch refactors each layer's sum at most at min(out, in))."""
    return rank == declared or declared > rank == min(shape)


def compatibility_problems(patch: ForgetPatch, patcher, clip=None) -> list[str]:
    """What does not match between the patch and the model (and CLIP) it is applied to."""
    problems = structure_problems(patch)
    arch = host.model_arch(patcher)
    if patch.base_arch is not None and patch.base_arch != arch:
        problems.append(f"the patch was made for {patch.base_arch}, the model is {arch}")
    if patch.gated:
        return problems + gate.fit_problems(patch.lora, host.attn2_layers(patcher))
    key_map = host.lora_key_map(patcher)
    modules = patch.unet_modules()
    shapes = host.weight_shapes(patcher, [key_map[m] for m in modules if m in key_map])
    declared = patch.metadata.get("fmn.rank")
    for module in modules:
        target = key_map.get(module)
        if target is None:
            problems.append(f"the model has no layer {module}")
            continue
        problems += _shape_problems(patch, module, shapes[target])
        up = patch.lora.get(f"{module}.lora_up.weight")
        if up is not None and up.ndim == 2 and declared not in (None, FULL_RANK) \
                and not rank_fits(up.shape[1], int(declared), shapes[target][:2]):
            problems.append(f"{module}: rank {up.shape[1]} vs the patch's declared rank {declared}")
    return problems + _text_problems(patch, clip)


def _shape_problems(patch: ForgetPatch, module: str, want: tuple[int, ...]) -> list[str]:
    up, down = patch.lora.get(f"{module}.lora_up.weight"), patch.lora.get(f"{module}.lora_down.weight")
    if up is None or down is None or up.ndim != 2 or down.ndim != 2 or (up.shape[0], down.shape[1]) == tuple(want[:2]):
        return []
    return [f"{module}: patch delta {up.shape[0]}x{down.shape[1]} vs model weight {want[0]}x{want[1]}"]


def _text_problems(patch: ForgetPatch, clip) -> list[str]:
    """A text-encoder side needs the CLIP it was trained for."""
    modules = patch.text_modules()
    if not modules:
        return []
    if clip is None:
        return ["it edits the text encoder (the rows of its concepts' words): connect the CLIP to Apply Forget Patch "
                "and use its CLIP output, or load it with the stock LoraLoader"]
    shapes = host.clip_lora_shapes(clip)
    problems = [f"the CLIP has no weight {m}" for m in modules if m not in shapes]
    return problems + [p for m in modules if m in shapes for p in _shape_problems(patch, m, shapes[m])]


def _checked(patch: ForgetPatch, patcher, strength: float, clip=None) -> None:
    low, high = STRENGTH_RANGE
    if not low <= strength <= high:
        raise ValueError(f"strength must be in [{low}, {high}], got {strength}")
    problems = compatibility_problems(patch, patcher, clip)
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError("forget patch does not fit this model: " + "; ".join(problems[:5]) + more)


def apply_patch(patcher, patch: ForgetPatch, strength: float):
    """A patched clone of `patcher`; the input model is never modified. A patch with a
    text-encoder side needs `apply_patch_with_clip`."""
    _checked(patch, patcher, strength)
    if patch.gated:
        return gate.applied(patcher, patch.lora, patch.metadata, strength)
    return host.apply_lora(patcher, patch.lora, strength)


def apply_patch_with_clip(patcher, clip, patch: ForgetPatch, strength: float) -> tuple:
    """(patched model, patched CLIP), both clones; the CLIP is passed through unchanged
    when the patch has no text-encoder side."""
    if not patch.text_modules():
        return apply_patch(patcher, patch, strength), clip
    _checked(patch, patcher, strength, clip)
    return host.apply_lora(patcher, patch.lora, strength, clip)
