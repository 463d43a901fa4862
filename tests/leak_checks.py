"""What a node may leave behind on host objects, as comparable snapshots: a test takes
one before a node runs and asserts the one after is equal."""
from __future__ import annotations

import torch

import comfy.model_management as mm


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules())


def host_state(model) -> dict:
    """The MODEL's patches, options, weight wrappers and functions, hooks, grad flags and
    the inference-mode flag of the calling thread."""
    modules = model.model.modules()
    return {
        "patches": dict(model.patches),
        "options": repr(model.model_options),
        "wrappers": dict(model.weight_wrapper_patches),
        "functions": sum(len(getattr(m, "weight_function", [])) + len(getattr(m, "bias_function", [])) for m in modules),
        "hooks": _hooks(model.model),
        "grad": any(p.requires_grad for p in model.model.parameters()),
        "inference": torch.is_inference_mode_enabled(),
    }


def clip_state(clip) -> dict:
    """The CLIP's patches, its tokenizer's vocabulary and embedding folders, hooks, grad flags."""
    inner = getattr(clip.tokenizer, getattr(clip.tokenizer, "clip", ""), None) or clip.tokenizer
    return {
        "patches": dict(clip.patcher.patches),
        "layer": clip.layer_idx,
        "vocab": len(inner.tokenizer.get_vocab()),
        "embedding_directory": repr(inner.embedding_directory),
        "hooks": _hooks(clip.cond_stage_model),
        "grad": any(p.requires_grad for p in clip.cond_stage_model.parameters()),
    }


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def cache_problems(model, before: dict[str, torch.Tensor]) -> list[str]:
    """A patched model held under the original's identity: the shared module carries weights
    other than the original's while the host believes they are the original's (no patch
    uuid, or the original's), so the next use of the original would skip restoring them."""
    module = model.model
    marked = getattr(module, "current_weight_patches_uuid", None)
    if marked is not None and marked != model.patches_uuid:
        return []  # the host knows the weights carry another clone's patches and restores them
    now = module.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(now[k], v)]
    held = [type(m.model).__name__ for m in mm.current_loaded_models if m.model is model]
    return [f"{len(changed)} weights differ from the original's (e.g. {changed[:2]}); loaded as the original: {held}"] if changed else []
