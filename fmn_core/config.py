"""Forget Train's settings: one dataclass with commented defaults, read by both Forget Train
nodes and the benchmark, and checked before a run starts."""
from __future__ import annotations

from dataclasses import dataclass

from . import checks
from .memory import check_precision
from .modes import MODES

# The warm start edits every concept's rows at once; beyond a few concepts with no keep list
# it moves their neighbours more than it helps. ToyBench (H, warm start against re-steering
# alone, same run): one concept mean 0.980 against 0.975, three concepts 0.947 against
# 0.931, identities 0.955 against 0.937, but objects 0.873 against 0.887, styles 0.879
# against 0.971, all but two 0.715 against 0.810. A keep list holds the neighbours in the
# edit (styles with the rest kept 0.994, all but two 0.915), so with one it always runs.
WARM_START_MAX_CONCEPTS = 3


# The in-run erasure (checks.py) at which a run stops, read off ToyBench (bench/quality.json,
# 'self_check'): see docs/self_check.md, "Stopping on a target".
DEFAULT_TARGET = 1.0
MAX_TARGET = 1.5


@dataclass
class ForgetConfig:
    steps: int = 150               # the paper uses 35; ToyBench: 150 erases more than 100 (bench/quality.json)
    learning_rate: float = 1e-1    # AdamW on the (head-scaled) low-rank factors
    rank: int = 4                  # directions (aimed; plus copy_rank(rank) for copies) or LoRA rank per concept
    seed: int = 0
    mode: str = "aimed k/v"        # a key of modes.MODES
    batch_size: int = 1
    include_end_token: bool = False
    output_weight: float = 10.0    # the output term (loss.py); 0 = the paper's loss
    negative_guidance: float = 0.5  # the output term's target pushed past the anchor (`pushed_away`); 0 = the anchor's
    max_grad_norm: float = 1.0     # really applied, every step
    weight_decay: float = 0.01
    resolution: int = 512          # pixel size of pure-noise latents when no image is given
    precision: str = "fp32"        # autocast: "fp32" (none), "bf16", "fp16" (memory.py)
    gradient_checkpointing: bool = False  # recompute UNet blocks in backward (memory.py)
    keep: tuple[str, ...] = ()     # concepts to keep (the preservation term); see `examples.build_examples`
    watch: tuple[str, ...] = ()    # concepts measured, not trained on: the report says how far each moved (checks.py)
    warm_start: bool = True        # start from a closed-form K/V edit (modes/aimed.py `warm_start`); see `warm_starts`
    target: float = DEFAULT_TARGET  # stop once every concept's in-run erasure reaches it (checks.py); 0 = run all steps
    check_every: int = checks.DEFAULT_CHECK_EVERY  # steps between in-run checks

    def warm_starts(self, n_concepts: int) -> bool:
        """Whether this run starts from the closed-form edit (see WARM_START_MAX_CONCEPTS)."""
        return (self.warm_start and MODES[self.mode].aimed
                and (n_concepts <= WARM_START_MAX_CONCEPTS or bool(self.keep)))

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.output_weight < 0:
            raise ValueError(f"output_weight must be 0 or more, got {self.output_weight}")
        if self.negative_guidance < 0:
            raise ValueError(f"negative_guidance must be 0 or more, got {self.negative_guidance}")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if not 0 <= self.target <= MAX_TARGET:
            raise ValueError(f"target must be between 0 (run every step) and {MAX_TARGET:g}, got {self.target}: it is "
                             "the in-run erasure at which training stops (1 = the anchor's prediction)")
        if self.check_every < 1:
            raise ValueError(f"check_every must be at least 1, got {self.check_every}")
        check_precision(self.precision)
