"""Training state for save-every-N and resume, so a long Forget Train or Concept Inversion
run survives Cancel, a crash or a closed laptop and ends exactly where an uninterrupted run
would.

A checkpoint is a usable result (`<name>_step<N>.safetensors`: the ordinary LoRA file, or
embedding file, so it can be applied or compared right away) plus a state file beside it
(`<name>_step<N>.fmn-state`, safetensors inside, never pickle; its suffix keeps it out of
the LoRA lists): the trainable factors, AdamW's moments and step counts, the random
generator's state and the losses so far. The random generator drives the
prompt, timestep, noise and latent draws, so with it restored the resumed steps draw what
the uninterrupted run drew.

Resuming checks the settings that shape the run (concepts, keep list, mode, rank, lr, seed,
...) against those the state was saved with: a resume with other settings would silently
train something else.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from .files import atomic_write
from .safetensors_check import load_checked

STATE_SUFFIX = ".fmn-state"
FORMAT = "forget-me-not-state/1"
# Config fields a resumed run may change: how long it runs and how it saves memory (neither
# changes what is trained). Every other field must match.
FREE_FIELDS = ("steps", "precision", "gradient_checkpointing", "watch")  # watch: measured, never trained on
# Settings added after the state format: a state without one was written by a run that had
# this value (the behaviour of the time), so it resumes when the inputs say the same and is
# refused, naming the setting, when they do not.
PREDATED_SETTINGS = {"warm_start": False, "negative_guidance": 0.0}


@dataclass
class TrainingState:
    """Everything the training loop needs to continue after `step` finished steps."""

    step: int
    params: list[torch.Tensor]
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    adam_steps: list[torch.Tensor]
    generator: torch.Tensor
    losses: list[float]
    checks: list[dict] = field(default_factory=list)  # the in-run checks so far (checks.py), for the resumed run's report


@dataclass
class Checkpoints:
    """Save-every-N settings of one run: every `every` steps (not at the last, which is the
    run's own result) the result so far is written to `path_for(step)` and its state beside it."""

    every: int
    path_for: Callable[[int], Path]

    def steps(self, total: int) -> list[int]:
        return list(range(self.every, total, self.every)) if self.every > 0 else []

    def due(self, done: int, total: int) -> bool:
        """Whether a checkpoint is written once `done` of `total` steps are finished."""
        return self.every > 0 and done % self.every == 0 and done < total

    def check_free(self, start: int, total: int) -> None:
        """Refuse before training, not after minutes of it, when a checkpoint would replace a file."""
        taken = [path.name for step in self.steps(total) if step > start and (path := self.path_for(step)).exists()]
        if taken:
            raise FileExistsError(f"checkpoint {taken[0]} already exists: pick another checkpoint name or move the old files")


def settings_of(config, **inputs) -> dict:
    """What must agree between a saved state and the run that resumes it: the config's
    fields (but steps) and the run's other inputs, as they read back from the file's JSON."""
    fields = {k: v for k, v in asdict(config).items() if k not in FREE_FIELDS}
    return json.loads(json.dumps({**fields, **inputs}))


def capture(step: int, params: list[torch.Tensor], optimizer: torch.optim.Optimizer, generator: torch.Generator,
            losses: list[float], checks: list[dict] = ()) -> TrainingState:
    states = [optimizer.state.get(p, {}) for p in params]
    zeros = [torch.zeros_like(p) for p in params]
    return TrainingState(
        step=step,
        params=[p.detach().clone() for p in params],
        exp_avg=[s.get("exp_avg", z).detach().clone() for s, z in zip(states, zeros)],
        exp_avg_sq=[s.get("exp_avg_sq", z).detach().clone() for s, z in zip(states, zeros)],
        adam_steps=[torch.as_tensor(s.get("step", 0.0), dtype=torch.float32).detach().clone() for s in states],
        generator=generator.get_state().clone(),
        losses=list(losses),
        checks=list(checks),
    )


def restore(state: TrainingState, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
            generator: torch.Generator) -> None:
    """Put a saved state back into a freshly built run (same settings, same parameter order)."""
    if len(state.params) != len(params) or any(s.shape != p.shape for s, p in zip(state.params, params)):
        raise ValueError("the training state does not fit this run's patch layout (another model or rank?)")
    with torch.no_grad():
        for p, saved in zip(params, state.params):
            p.copy_(saved.to(p.device, p.dtype))
    for p, avg, avg_sq, step in zip(params, state.exp_avg, state.exp_avg_sq, state.adam_steps):
        if bool((step > 0).any()):  # a scalar (AdamW) or one count per column (ColumnAdamW)
            optimizer.state[p] = {"step": step.clone(), "exp_avg": avg.to(p.device, p.dtype).clone(),
                                  "exp_avg_sq": avg_sq.to(p.device, p.dtype).clone()}
    generator.set_state(state.generator)


def starting_state(resume: Path | None, checkpoints: Checkpoints | None, settings: dict,
                   steps: int) -> TrainingState | None:
    """The saved state a run continues from (None: a fresh run), after refusing a state that
    has already reached `steps` and any checkpoint file the run would replace."""
    state = load_state(resume, settings) if resume is not None else None
    start = state.step if state is not None else 0
    if start >= steps:
        raise ValueError(f"the training state is at step {start} and steps is {steps}: raise steps to continue")
    if checkpoints is not None:
        checkpoints.check_free(start, steps)
    return state


def resumed(state: TrainingState | None, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
            generator: torch.Generator, progress=None) -> tuple[int, list[float]]:
    """(first step to run, losses so far) of a freshly built run; a saved state is put back
    into it first, and a progress bar moved to where it left off."""
    if state is None:
        return 0, []
    restore(state, params, optimizer, generator)
    if progress is not None:
        progress.start_at(state.step)
    return state.step, list(state.losses)


def state_path(patch_path: str | Path) -> Path:
    return Path(patch_path).with_suffix(STATE_SUFFIX)


def save_state(path: Path, state: TrainingState, settings: dict, overwrite: bool = True) -> Path:
    tensors = {"generator": state.generator.float().contiguous()}  # its bytes, as floats: the checked reader takes floats only
    for name, values in (("param", state.params), ("exp_avg", state.exp_avg), ("exp_avg_sq", state.exp_avg_sq),
                         ("adam_step", state.adam_steps)):
        tensors.update({f"{name}.{i}": v.detach().float().cpu().contiguous() for i, v in enumerate(values)})
    metadata = {"fmn.format": FORMAT, "fmn.step": str(state.step), "fmn.settings": json.dumps(settings, sort_keys=True),
                "fmn.losses": json.dumps(state.losses), "fmn.checks": json.dumps(state.checks),
                "fmn.count": str(len(state.params))}
    return atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite)


def load_state(path: Path, settings: dict) -> TrainingState:
    """Read a state file and check it was saved by a run with these settings."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no training state {Path(path).name} beside the file: only checkpoints written by "
                                "save_every (Forget Train, Concept Inversion) can be resumed")
    tensors, metadata = load_checked(path, "training state", suffix=STATE_SUFFIX)
    try:
        if metadata.get("fmn.format") != FORMAT:
            raise ValueError(f"format is {metadata.get('fmn.format')!r}, expected {FORMAT!r}")
        saved, count = json.loads(metadata["fmn.settings"]), int(metadata["fmn.count"])
        state = TrainingState(
            step=int(metadata["fmn.step"]),
            params=[tensors[f"param.{i}"] for i in range(count)],
            exp_avg=[tensors[f"exp_avg.{i}"] for i in range(count)],
            exp_avg_sq=[tensors[f"exp_avg_sq.{i}"] for i in range(count)],
            adam_steps=[tensors[f"adam_step.{i}"] for i in range(count)],
            generator=tensors["generator"].to(torch.uint8),
            losses=[float(x) for x in json.loads(metadata["fmn.losses"])],
            checks=list(json.loads(metadata.get("fmn.checks", "[]"))),  # states saved before the checks have none
        )
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{Path(path).name} is not a valid Forget-Me-Not training state: {e}") from None
    saved = {**{k: v for k, v in PREDATED_SETTINGS.items() if k in settings}, **saved}
    differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if differ:
        detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {settings.get(k)!r}" for k in differ[:4])
        raise ValueError(f"{Path(path).name} was saved by a run with other settings ({detail}): resume with the "
                         "same inputs and settings, changing only steps")
    return state
