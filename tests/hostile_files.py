"""A pickle that would give itself away: shared by the tests that check pickles are never loaded."""
from __future__ import annotations

import pickle
from pathlib import Path


class _Payload:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def trap_pickle(marker: Path) -> bytes:
    """Pickle bytes whose unpickling creates `marker`: if it exists afterwards, something unpickled."""
    return pickle.dumps(_Payload(str(marker)))
