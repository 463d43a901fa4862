"""Running the host's UNet: attn2 replaces chained to other packs', a trainable clone
with differentiable weight wrappers (removed on exit), and the plain forward."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from .model import VAE_FACTOR, Attn2Layer

AttnReplace = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def existing_attn2_replace(patcher, block: tuple[str, int, int]) -> AttnReplace | None:
    """Another pack's attn2 replace for this block, if any (the host prefers the 3-key form)."""
    replaces = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return replaces.get(block, replaces.get(block[:2]))


def register_attn2(patcher, layers: list[Attn2Layer], make: Callable[[Attn2Layer, AttnReplace | None], AttnReplace]) -> None:
    """Register one replace per layer on `patcher` (a clone), chained to any previous one."""
    for layer in layers:
        previous = existing_attn2_replace(patcher, layer.block)
        patcher.set_model_attn2_replace(make(layer, previous), *layer.block)


class _CopyWeight:
    """Identity weight/bias wrapper: its presence makes the host copy the tensor at cast time.

    Weights loaded under `torch.inference_mode()` are inference tensors, which autograd
    refuses to save for backward; the host's own trainer avoids that the same way.
    """

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


def _needs_weight_copies(patcher) -> bool:
    return any(p.is_inference() for p in patcher.model.diffusion_model.parameters())


def unet_blocks(patcher) -> list[torch.nn.Module]:
    """The UNet's ResBlocks and transformer blocks: the units gradient checkpointing
    recomputes (between them sit only up/down-sampling convolutions)."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    return [m for m in patcher.model.diffusion_model.modules() if isinstance(m, (ResBlock, SpatialTransformer))]


@contextlib.contextmanager
def trainable_unet(patcher, wrappers: dict[str, torch.nn.Module], to_device: torch.device | None = None) -> Iterator[Callable]:
    """Load a clone of `patcher` with differentiable weight wrappers and yield its forward.

    The forward is `fn(x_noisy, sigma, context) -> denoised`, run with the clone's
    transformer options (so attn2 replaces registered on the clone are active). On exit
    the clone is unloaded and every wrapper this function installed is removed from the
    shared modules, so nothing of the run remains on host objects.
    """
    import comfy.model_management as mm

    installed: list[torch.nn.Module | _CopyWeight] = list(wrappers.values())
    for key, wrapper in wrappers.items():
        patcher.add_weight_wrapper(key, wrapper)
    if _needs_weight_copies(patcher):
        for name, module in patcher.model.named_modules():
            if not hasattr(module, "weight_function"):
                continue
            for attr in ("weight", "bias"):  # norms save both for backward
                key = f"{name}.{attr}"
                if getattr(module, attr, None) is not None and key not in wrappers:
                    copy = _CopyWeight()
                    patcher.add_weight_wrapper(key, copy)
                    installed.append(copy)
    flags = {p: p.requires_grad for p in patcher.model.parameters()}
    try:
        patcher.model.requires_grad_(False)
        mm.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)
        yield unet_forward(patcher)
    finally:
        _unload(patcher, installed)
        _restore_requires_grad(flags)


def _restore_requires_grad(flags: dict[torch.nn.Parameter, bool]) -> None:
    for parameter, flag in flags.items():
        if parameter.requires_grad != flag:
            # inference tensors only accept the flag inside inference mode
            with torch.inference_mode(parameter.is_inference()):
                parameter.requires_grad_(flag)


def _unload(patcher, installed: list) -> None:
    import comfy.model_management as mm

    for i, loaded in enumerate(list(mm.current_loaded_models)):
        if loaded.model is patcher:
            mm.current_loaded_models.pop(i)
            loaded.model_unload()
            break
    ours = {id(w) for w in installed}
    for module in patcher.model.modules():
        for attr in ("weight_function", "bias_function"):
            functions = getattr(module, attr, None)
            if functions:
                setattr(module, attr, [f for f in functions if id(f) not in ours])


def loaded_forward(patcher) -> Callable:
    """Load `patcher` (merging its weight patches) and return its UNet forward, for
    measurements under no_grad: `fn(x_noisy, sigma, context) -> denoised`."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    return unet_forward(patcher)


def unet_forward(patcher) -> Callable:
    """`fn(x_noisy, sigma, context, pooled=None) -> denoised` through the host's
    apply_model with the patcher's transformer options (so its attn2 replaces run).

    Models with a vector conditioning (SDXL: the pooled text embedding and the image size)
    get it from `pooled` and the latent's size, as the host's sampler builds it."""
    model = patcher.model
    options = patcher.model_options["transformer_options"]

    def forward(x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        extra = {"y": _vector_conditioning(model, x, pooled)} if model.adm_channels else {}
        return model.apply_model(x, sigma, c_crossattn=context, transformer_options=options, **extra)

    return forward


def _vector_conditioning(model, x: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
    if pooled is None:
        raise ValueError(f"model type {type(model.model_config).__name__} needs the prompt's pooled text embedding "
                         "(host.encode_pooled) beside its context")
    y = model.encode_adm(pooled_output=pooled.to(x.device), width=x.shape[-1] * VAE_FACTOR,
                         height=x.shape[-2] * VAE_FACTOR, device=x.device)
    return y.to(x.device).expand(x.shape[0], -1) if y.shape[0] == 1 else y.to(x.device)
