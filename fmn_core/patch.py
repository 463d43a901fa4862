"""Forget patches: a kohya-format LoRA safetensors file plus Forget-Me-Not metadata.

The file loads unchanged through the host's stock `LoraLoaderModelOnly`; applying it
here goes through the same host function, so both yield the same weights. Loading never
unpickles: the header is parsed and checked by hand before safetensors reads tensors.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import host
from .files import atomic_write
from .lora import FULL_RANK

SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha")
ALLOWED_DTYPES = {"F16", "F32", "BF16"}
MAX_HEADER = 16 * 1024 * 1024
STRENGTH_RANGE = (-10.0, 10.0)


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

    def modules(self) -> list[str]:
        return sorted({k[: -len(s)] for k in self.lora for s in SUFFIXES if k.endswith(s)})

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.lora.values())


def save_patch(patch: ForgetPatch, path: Path, overwrite: bool = False) -> Path:
    return atomic_write(Path(path), lambda tmp: save_file(patch.lora, tmp, metadata=patch.metadata), overwrite)


def read_header(path: str | os.PathLike) -> dict:
    """The safetensors JSON header, validated for size, dtypes and offsets."""
    name = os.fspath(path)
    if not name.endswith(".safetensors"):
        raise ValueError(f"{os.path.basename(name)} is not a .safetensors file: forget patches are only read from safetensors")
    size = os.path.getsize(name)
    with open(name, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{os.path.basename(name)} is too short to be a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER, size - 8):
            raise ValueError(f"{os.path.basename(name)} declares a {length}-byte header in a {size}-byte file: corrupt or not safetensors")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{os.path.basename(name)} has an unreadable header ({e}): corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise ValueError(f"{os.path.basename(name)} has a malformed header (not an object)")
    _check_entries(os.path.basename(name), header, size - 8 - length)
    return header


def _check_entries(name: str, header: dict, data_size: int) -> None:
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError(f"{name}: metadata must map strings to strings")
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in ALLOWED_DTYPES:
            raise ValueError(f"{name}: tensor {key!r} has dtype {entry.get('dtype') if isinstance(entry, dict) else entry!r}; "
                             f"patches hold only {', '.join(sorted(ALLOWED_DTYPES))}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if (not isinstance(shape, list) or len(shape) > 2 or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"{name}: tensor {key!r} has a malformed shape or offsets")
        width = 4 if entry["dtype"] == "F32" else 2
        count = shape[0] * shape[1] if len(shape) == 2 else (shape[0] if shape else 1)
        if not 0 <= offsets[0] <= offsets[1] <= data_size or offsets[1] - offsets[0] != count * width:
            raise ValueError(f"{name}: tensor {key!r} declares shape {shape} that does not fit its data")


def load_patch(path: str | os.PathLike) -> ForgetPatch:
    """Read and validate a patch file; never unpickles."""
    header = read_header(path)
    lora = load_file(os.fspath(path))
    patch = ForgetPatch(lora, dict(header.get("__metadata__", {})))
    problems = structure_problems(patch)
    if problems:
        raise ValueError(f"{os.path.basename(os.fspath(path))} is not a valid forget patch: " + "; ".join(problems))
    return patch


def structure_problems(patch: ForgetPatch) -> list[str]:
    """What is wrong with the patch on its own (keys, factor shapes, values)."""
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
    bad = [k for k, v in patch.lora.items() if not torch.isfinite(v.float()).all()]
    if bad:
        problems.append(f"non-finite values in {bad[:3]}")
    return problems


def compatibility_problems(patch: ForgetPatch, patcher) -> list[str]:
    """What does not match between the patch and the model it is applied to."""
    problems = structure_problems(patch)
    arch = host.model_arch(patcher)
    if patch.base_arch is not None and patch.base_arch != arch:
        problems.append(f"the patch was made for {patch.base_arch}, the model is {arch}")
    key_map = host.lora_key_map(patcher)
    modules = patch.modules()
    shapes = host.weight_shapes(patcher, [key_map[m] for m in modules if m in key_map])
    declared = patch.metadata.get("fmn.rank")
    for module in modules:
        target = key_map.get(module)
        if target is None:
            problems.append(f"the model has no layer {module}")
            continue
        up, down = patch.lora.get(f"{module}.lora_up.weight"), patch.lora.get(f"{module}.lora_down.weight")
        if up is None or down is None or up.ndim != 2 or down.ndim != 2:
            continue
        want = shapes[target]
        if (up.shape[0], down.shape[1]) != tuple(want[:2]):
            problems.append(f"{module}: patch delta {up.shape[0]}x{down.shape[1]} vs model weight {want[0]}x{want[1]}")
        if declared not in (None, FULL_RANK) and str(up.shape[1]) != declared:
            problems.append(f"{module}: rank {up.shape[1]} vs the patch's declared rank {declared}")
    return problems


def apply_patch(patcher, patch: ForgetPatch, strength: float):
    """A patched clone of `patcher`; the input model is never modified."""
    low, high = STRENGTH_RANGE
    if not low <= strength <= high:
        raise ValueError(f"strength must be in [{low}, {high}], got {strength}")
    problems = compatibility_problems(patch, patcher)
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError("forget patch does not fit this model: " + "; ".join(problems[:5]) + more)
    return host.apply_lora(patcher, patch.lora, strength)
