"""The one training loop every Forget Train mode runs through (docs/method.md).

Each step draws a batch from the mode (a concept latent or pure noise, noised at a uniform
timestep, with one of the concept's template prompts), runs the UNet with the attn2 hooks,
and minimises `loss.step_loss` with AdamW; the gradient is really clipped. What trains, how
its deltas are built and how they are exported is the mode's (`modes/`). The loop owns
what every mode shares: the in-run checks (`checks.SelfCheck`, stopping on `target` every
`check_every` steps), checkpoints and resume with the check history, progress, precision
and recomputation, and the patch header (`describe`).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import check_report, checks, host
from .attention import ColumnEnergy, Routed, make_attn2_replace
from .checkpoint import Checkpoints, TrainingState, capture, resumed, save_state, settings_of, starting_state, state_path
from .concepts import Concept
from .config import ForgetConfig
from .latents import LatentSource
from .lora import FULL_RANK
from .loss import check_finite, check_finite_tensors, step_loss
from .memory import Precision, checkpointed
from .modes import MODES, Run, Trainee
from .patch import ForgetPatch, model_card, save_patch

log = logging.getLogger(__name__)


@dataclass
class ForgetResult:
    lora: dict[str, torch.Tensor]
    metadata: dict[str, str]
    losses: list[float] = field(default_factory=list)
    report: check_report.CheckReport | None = None


def forget(patcher, clip, concepts: list[Concept], config: ForgetConfig,
           latents: dict[int, torch.Tensor] | None = None, progress=None,
           checkpoints: Checkpoints | None = None, resume: Path | None = None) -> ForgetResult:
    """Train a forget patch for `concepts` on a clone of `patcher`; the input is untouched.

    `checkpoints` writes a patch and its training state every N steps; `resume` (a state
    file) continues such a run from its step, with the same settings, to `config.steps`."""
    config.validate()
    mode = MODES[config.mode]
    if not mode.trainee.writes_checkpoints and (checkpoints is not None or resume is not None):
        raise ValueError(f"mode '{config.mode}' trains in seconds and writes no checkpoints: set save_every to 0 and "
                         "resume_from to none")
    generator = torch.Generator().manual_seed(config.seed)
    layers = host.attn2_layers(patcher)
    settings, state = None, None
    if mode.trainee.writes_checkpoints:
        settings = settings_of(config, concepts=[c.text for c in concepts],
                               base_fingerprint=host.model_fingerprint(patcher, layers))
        state = starting_state(resume, checkpoints, settings, config.steps)
    shape = (patcher.model.diffusion_model.in_channels, config.resolution // 8, config.resolution // 8)
    source = LatentSource({k: v.float() for k, v in (latents or {}).items()}, shape)
    sampling = host.model_sampling(patcher)
    trainee = mode.start(Run(patcher, clip, concepts, config, layers, generator, source, sampling, host.device()))
    material_from = time.perf_counter()
    stuff = checks.material(clip, concepts, config.keep, sampling, shape, latents, config.watch)
    material_seconds = time.perf_counter() - material_from  # encoding the checks' prompts: part of their cost

    with torch.inference_mode(False):
        params = trainee.build()
        optimizer = trainee.optimizer()
        sink = ColumnEnergy()
        route = Routed(sink)
        clone = patcher.clone()
        trainee.install(clone)
        host.register_attn2(clone, layers, lambda layer, previous: make_attn2_replace(layer.module, route, previous))
        precision = Precision(config.precision, host.device())
        blocks = host.unet_blocks(clone) if config.gradient_checkpointing else []
        start, losses = resumed(state, params, optimizer, generator, progress)
        with host.trainable_unet(clone, trainee.weights) as unet, checkpointed(blocks, sink.recomputing):
            if state is None:
                trainee.warm_start(clone)
            checker = checks.SelfCheck(stuff, unet, trainee.original, route, config.target, config.steps,
                                       config.check_every, trainee.held_out,
                                       earlier=state.checks if state is not None else ())
            checker.report.check_seconds += material_seconds
            started, checked_before, done = time.perf_counter(), checker.report.check_seconds, start
            for step in range(start, config.steps):
                batch = trainee.batch(step)
                with precision.autocast():
                    loss = step_loss(unet, sink, batch, trainee.deltas, trainee.output_scale * config.output_weight,
                                     config.negative_guidance, host.device())
                optimizer.zero_grad(set_to_none=True)
                precision.backward(loss)
                grad_norm = precision.unscale_and_clip(optimizer, params, config.max_grad_norm)
                check_finite(step, loss, grad_norm, precision.scaling)
                trainee.stepped(optimizer, batch)
                precision.step(optimizer)
                losses.append(float(loss.detach()))
                done = step + 1
                stop = checker.due(done) and checker.check(done)
                if not stop and checkpoints is not None and checkpoints.due(done, config.steps):
                    _write_checkpoint(checkpoints.path_for(done), trainee, replace(config, steps=done), settings,
                                      capture(done, params, optimizer, generator, losses, checker.report.history))
                if progress is not None:
                    progress.step()
                if stop:
                    break
            # the steps' own seconds: the checks made between them are counted as the checks'
            checked = checker.report.check_seconds - checked_before
            report = checker.finish(done, time.perf_counter() - started - checked)
        for p in params:
            p.requires_grad_(False)

    lora, fields = trainee.export()
    check_finite_tensors(lora)
    metadata = {**describe(patcher, layers, concepts, replace(config, steps=report.steps), trainee.rank, losses, report),
                **fields}
    log.info("Forget-Me-Not (%s): %d of %d steps, loss %.4f -> %.4f; %s", config.mode, report.steps, config.steps,
             losses[0], losses[-1], check_report.verdict(report))
    return ForgetResult(lora, metadata, losses, report)


def _write_checkpoint(path: Path, trainee: Trainee, config: ForgetConfig, settings: dict, state: TrainingState) -> None:
    """The patch as it stands after `config.steps` steps, and the state to resume from it."""
    run = trainee.run
    lora, fields = trainee.export()
    check_finite_tensors(lora)
    metadata = {**describe(run.patcher, run.layers, run.concepts, config, trainee.rank, state.losses), **fields}
    save_patch(ForgetPatch(lora, metadata), path)
    save_state(state_path(path), state, settings)


def describe(patcher, layers, concepts: list[Concept], config: ForgetConfig, rank: int, losses: list[float],
             report: check_report.CheckReport | None = None) -> dict[str, str]:
    """Patch header metadata (safetensors metadata values are strings); with the run's
    check report, its figures (`fmn.self_check`) and verdict on the model card."""
    from . import __version__

    mode = MODES[config.mode]
    card = model_card(host.model_arch(patcher), [c.text for c in concepts], [c.category for c in concepts],
                      config.steps, config.mode, mode.token_rows, mode.gated,
                      check_report.verdict(report) if report is not None else "")
    measured = {check_report.REPORT_KEY: report.to_json(), "fmn.target": repr(config.target)} if report is not None else {}
    return {
        **measured,
        **card,
        "fmn.format": "forget-me-not/1",
        "fmn.pack_version": __version__,
        "fmn.concepts": json.dumps([c.text for c in concepts]),
        "fmn.categories": json.dumps([c.category for c in concepts]),
        "fmn.anchors": json.dumps([c.anchor for c in concepts]),
        "fmn.keep": json.dumps(list(config.keep)),
        "fmn.base_arch": host.model_arch(patcher),
        "fmn.base_fingerprint": host.model_fingerprint(patcher, layers),
        "fmn.context_dim": str(layers[0].context_dim),
        "fmn.mode": config.mode,
        "fmn.warm_start": str(config.warm_starts(len(concepts))).lower(),
        "fmn.output_weight": repr(config.output_weight),
        "fmn.negative_guidance": repr(config.negative_guidance),
        "fmn.rank": FULL_RANK if mode.dense else str(rank),
        "fmn.steps": str(config.steps),
        "fmn.learning_rate": repr(config.learning_rate),
        "fmn.seed": str(config.seed),
        "fmn.losses": json.dumps([round(x, 5) for x in losses]),
        "fmn.final_loss": repr(round(losses[-1], 6)) if losses and math.isfinite(losses[-1]) else "nan",
    }
