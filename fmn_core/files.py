"""Safe file names and atomic writes for everything the pack saves."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable

_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
MAX_NAME = 120


def safe_filename(name: str, suffix: str) -> str:
    """A bare file name that cannot leave its folder: separators, dots-only and reserved
    names are refused or replaced, and the suffix is enforced."""
    stem = name.strip()
    if stem.lower().endswith(suffix):
        stem = stem[: -len(suffix)]
    stem = re.sub(r"[^A-Za-z0-9._ -]+", "_", stem).strip(" .")
    if not stem or set(stem) <= {".", "_"}:
        raise ValueError(f"file name {name!r} has no usable characters: use letters, digits, '-', '_' or '.'")
    if stem.split(".")[0].lower() in _RESERVED:
        stem = f"_{stem}"
    return stem[:MAX_NAME] + suffix


def inside(folder: str | Path, filename: str) -> Path:
    """`folder/filename`, refusing anything that would resolve outside `folder`."""
    root = Path(folder).resolve()
    path = (root / filename).resolve()
    if path.parent != root:
        raise ValueError(f"refusing to write {filename!r}: it would land outside {root}")
    return path


def atomic_write(path: Path, write: Callable[[str], None], overwrite: bool) -> Path:
    """Write through a temporary file in the same folder, then rename: a failed or
    interrupted write leaves no partial file, and an existing file is kept unless asked."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path.name} already exists in {path.parent}: pick another name or enable overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if not overwrite and path.exists():
            raise FileExistsError(f"{path.name} appeared in {path.parent} while writing: pick another name")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
