"""Forget Train's public entry points, gathered from where they live (the names the nodes,
the benchmark scripts and the tests import):

- `config.py`: `ForgetConfig`, the settings both nodes and the benchmark read;
- `loop.py`: `forget`, the one training loop every mode runs through, and `describe`, the
  patch header;
- `modes/`: one module per training mode behind one interface (`modes/base.py`) and the
  registry `MODES` (`USER_MODES`: those the nodes offer);
- `examples.py`: the training prompts; `loss.py`: one step's loss; `latents.py`: the
  training latents.
"""
from __future__ import annotations

from .config import DEFAULT_TARGET, MAX_TARGET, WARM_START_MAX_CONCEPTS, ForgetConfig
from .examples import (Example, anchor_moment, build_examples, preserve_contexts, preserve_moment, preserved)
from .latents import LatentSource, latents_for_concepts
from .loop import ForgetResult, describe, forget
from .loss import KEEP, Sample, check_finite, check_finite_tensors, pushed_away, step_loss
from .modes import MODES, USER_MODES, TrainMode
from .modes.aimed import concept_basis, copy_rank, warm_start
from .modes.lowrank import build_deltas

__all__ = [
    "DEFAULT_TARGET", "MAX_TARGET", "WARM_START_MAX_CONCEPTS", "ForgetConfig", "Example", "anchor_moment",
    "build_examples", "preserve_contexts", "preserve_moment", "preserved", "LatentSource", "latents_for_concepts",
    "ForgetResult", "describe", "forget", "KEEP", "Sample", "check_finite", "check_finite_tensors", "pushed_away",
    "step_loss", "MODES", "USER_MODES", "TrainMode", "concept_basis", "copy_rank", "warm_start", "build_deltas",
]
