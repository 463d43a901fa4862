"""The host's progress bar and interrupt check."""
from __future__ import annotations


class Progress:
    """The host's progress bar plus its interrupt check, one call per step."""

    def __init__(self, total: int):
        import comfy.utils

        self._bar = comfy.utils.ProgressBar(total)

    def step(self) -> None:
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()
        self._bar.update(1)

    def start_at(self, done: int) -> None:
        """A resumed run: the bar starts at the steps already done."""
        self._bar.update_absolute(done)
