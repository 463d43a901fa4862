"""LoRA patches as the host applies them (its key maps, the stock loaders' call) and a
whole checkpoint's tensors as the host saves them."""
from __future__ import annotations

import torch


def lora_key_map(patcher) -> dict[str, str]:
    """The host's LoRA key conventions for this model (kohya, diffusers, generic)."""
    import comfy.lora

    return comfy.lora.model_lora_keys_unet(patcher.model, {})


def clip_lora_shapes(clip) -> dict[str, tuple[int, ...]]:
    """LoRA module name -> weight shape for every text-encoder weight the host's CLIP key
    map reaches (its generic `text_encoders.` names included)."""
    import comfy.lora

    state = clip.cond_stage_model.state_dict()
    return {module: tuple(state[key].shape) for module, key in comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}).items()}


def apply_lora(patcher, lora: dict[str, torch.Tensor], strength: float, clip=None):
    """Clone and patch exactly as the stock LoraLoaderModelOnly does; with `clip`, as the
    stock LoraLoader does, and return (model, clip)."""
    import comfy.sd

    patched, patched_clip = comfy.sd.load_lora_for_models(patcher, clip, lora, strength, strength)
    return patched if clip is None else (patched, patched_clip)


def checkpoint_state_dict(base_model, clip_state_dict: dict, vae_state_dict: dict) -> dict[str, torch.Tensor]:
    """A whole checkpoint's tensors, keyed as the host saves them (`model.diffusion_model.`,
    `cond_stage_model.`, `first_stage_model.` for SD1.x), from a host `BaseModel`.

    The call moved between the supported hosts: up to 0.3.x `BaseModel.state_dict_for_saving(
    clip, vae)` read its own UNet; later hosts take the UNet's state dict first
    (`state_dict_for_saving(unet, clip, vae)`), and the old call silently saves the CLIP
    weights in the UNet's place there. The signature says which one this host has.
    """
    import inspect

    saving = base_model.state_dict_for_saving
    if "unet_state_dict" in inspect.signature(saving).parameters:
        state = saving(base_model.diffusion_model.state_dict(), clip_state_dict=clip_state_dict,
                       vae_state_dict=vae_state_dict)
    else:
        state = saving(clip_state_dict=clip_state_dict, vae_state_dict=vae_state_dict)
    unet_keys = sum(k.startswith("model.diffusion_model.") for k in state)
    expected = len(base_model.diffusion_model.state_dict())
    if unet_keys != expected:
        raise RuntimeError(f"the host's state_dict_for_saving gave {unet_keys} UNet tensors, the model has {expected}: "
                           "its signature changed again; update fmn_core.host.checkpoint_state_dict")
    return state
