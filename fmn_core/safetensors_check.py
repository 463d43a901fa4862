"""Reading safetensors files from strangers: the header is parsed and checked by hand
before safetensors reads a single tensor.

A hostile file can declare a header of gigabytes, shapes whose product overflows, dtypes
that are not floats, offsets that point past the end or overlap, and metadata of any JSON
type. Each is refused here with the file's name and what is wrong, in time and memory
bounded by the file's size; nothing is ever unpickled (only `.safetensors` is read).
"""
from __future__ import annotations

import json
import math
import os
import struct

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

FLOAT_DTYPES = {"F16": 2, "F32": 4, "BF16": 2}
MAX_HEADER = 16 * 1024 * 1024


def read_header(path: str | os.PathLike, what: str, max_ndim: int = 2, suffix: str = ".safetensors") -> dict:
    """The JSON header of `path`, after checking it describes float tensors of at most
    `max_ndim` dimensions that exactly tile the data. `what` names the file's role in errors;
    `suffix` is the only file ending accepted (safetensors inside, whatever the name)."""
    name = os.path.basename(os.fspath(path))
    if not os.fspath(path).endswith(suffix):
        raise ValueError(f"{name} is not a {suffix} file: {what} files are only read from safetensors "
                         "(pickle-based .pt/.ckpt/.bin files are never loaded)")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{name} is too short to be a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER, size - 8):
            raise ValueError(f"{name} declares a {length}-byte header in a {size}-byte file: corrupt or not safetensors")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{name} has an unreadable header ({type(e).__name__}): corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise ValueError(f"{name} has a malformed header (not an object): corrupt or not safetensors")
    _check_entries(name, what, header, size - 8 - length, max_ndim)
    return header


def _check_entries(name: str, what: str, header: dict, data_size: int, max_ndim: int) -> None:
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError(f"{name}: metadata must map strings to strings")
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: tensor {key!r} has dtype {dtype!r}; {what} files hold only "
                             f"{', '.join(sorted(FLOAT_DTYPES))}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if (not isinstance(shape, list) or len(shape) > max_ndim or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)):
            raise ValueError(f"{name}: tensor {key!r} has a malformed shape or offsets")
        if not 0 <= offsets[0] <= offsets[1] <= data_size or offsets[1] - offsets[0] != math.prod(shape) * FLOAT_DTYPES[dtype]:
            raise ValueError(f"{name}: tensor {key!r} declares shape {shape} that does not fit its data")
        spans.append(offsets)
    spans.sort()
    ends = [0] + [end for _, end in spans]
    if [start for start, _ in spans] != ends[:-1] or ends[-1] != data_size:
        raise ValueError(f"{name}: the tensors do not tile the data exactly (gaps, overlaps or trailing bytes): "
                         "corrupt or crafted file")


def load_checked(path: str | os.PathLike, what: str, max_ndim: int = 2,
                 suffix: str = ".safetensors") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a checked file; every value finite."""
    header = read_header(path, what, max_ndim, suffix)
    try:
        tensors = load_file(os.fspath(path))
    except SafetensorError as e:  # a case the checks above missed: still a clear refusal
        raise ValueError(f"{os.path.basename(os.fspath(path))} cannot be read as safetensors ({e})") from None
    bad = [k for k, v in tensors.items() if not torch.isfinite(v.float()).all()]
    if bad:
        raise ValueError(f"{os.path.basename(os.fspath(path))}: non-finite values in {bad[:3]}")
    return tensors, dict(header.get("__metadata__", {}))
