"""The kohya LoRA conventions a patch file follows, so that every LoRA loader reads it.

Module names. kohya's sd-scripts, whose files every LoRA loader reads by default, names a
module `lora_unet_` + its path with `_`, the path taken in the UNet it trains: for SD1.x
and SD2.x the diffusers UNet (`lora_unet_down_blocks_0_attentions_0_..._attn2_to_k`), for
SDXL the SGM UNet that the host uses too (`lora_unet_input_blocks_4_1_..._attn2_to_k`).
diffusers' SD1.x/2.x loader reads SGM names only when its caller passes the UNet config
(its SDXL loader does, its SD1 loader does not), so an SD1 patch in the host's naming did
not load there. The pack trains on the host's names (`lora.kohya_name`) and writes files
in kohya's naming for their architecture (`renamed`). The host's key map (ComfyUI, and
Forge, whose map is ComfyUI's) and A1111's name rules read both namings as the same
weights, so patches written by earlier versions, in SGM names throughout, still load.

Header. LoRA managers and model sites show kohya's `ss_*` training fields and the
`modelspec.*` card (ModelSpec, which sd-scripts writes too); `header` gives the ones that
describe the file itself (format, rank, alpha, base model family) and the training comment,
and claims nothing about a training run that a forget patch did not have.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

UNET_PREFIX = "lora_unet_"
# kohya's sd-scripts builds SD1.x/2.x UNets with two ResBlocks per level (library/
# original_unet.py, LAYERS_PER_BLOCK = 2); diffusers' SD configs and the host's SD1/SD2
# configs (num_res_blocks 2) agree. So each level takes 3 SGM input blocks (two layers and
# a downsampler) and 3 output blocks.
LAYERS_PER_BLOCK = 2
# A module inside one of the host's SpatialTransformers (always at index 1 of an SD1.x/2.x
# SGM block): the part of the name kept as it is after the block.
_SGM_TRANSFORMER = re.compile(
    r"^lora_unet_(?:input_blocks_(?P<input>\d+)|middle_block|output_blocks_(?P<output>\d+))"
    r"_1_(?P<rest>transformer_blocks_\d+_\w+|proj_in|proj_out|norm)$"
)
NETWORK_MODULE = "networks.lora"  # kohya's module for lora_up / lora_down / alpha files
# modelspec.implementation: whose module names the file's keys follow (sd-scripts writes
# "diffusers" for SD1.x/2.x LoRAs and the SGM repository for SDXL ones).
IMPL_DIFFUSERS = "diffusers"
IMPL_SGM = "https://github.com/Stability-AI/generative-models"
IMPL_COMFYUI = "https://github.com/comfyanonymous/ComfyUI"


@dataclass(frozen=True)
class Family:
    """What kohya's sd-scripts writes for one model family."""

    version: str  # ss_base_model_version
    v2: bool  # ss_v2
    diffusers_names: bool  # modules named by the diffusers UNet (SD1.x/2.x), else by the SGM one (SDXL)


# The host's model config class (fmn.base_arch) -> its family. SD2 is written as sd_v2
# whatever its prediction type: the patch does not record whether its base was a v model.
FAMILIES = {
    "SD15": Family("sd_v1", False, True),
    "SD20": Family("sd_v2", True, True),
    "SD21UnclipL": Family("sd_v2", True, True),
    "SD21UnclipH": Family("sd_v2", True, True),
    "SDXL": Family("sdxl_base_v1-0", False, False),
}


def module_name(module: str, arch: str | None) -> str:
    """The name kohya's sd-scripts gives `module` (a LoRA module name in either naming) in
    a model of family `arch`; names it would not write differently stay as they are."""
    family = FAMILIES.get(arch or "")
    match = _SGM_TRANSFORMER.match(module)
    if family is None or not family.diffusers_names or match is None:
        return module
    return f"{UNET_PREFIX}{_diffusers_block(match['input'], match['output'])}_{match['rest']}"


def _diffusers_block(input_block: str | None, output_block: str | None) -> str:
    """The diffusers name of the attention in an SGM input, middle or output block."""
    per_level = LAYERS_PER_BLOCK + 1
    if input_block is not None:
        level, index = divmod(int(input_block) - 1, per_level)
        return f"down_blocks_{level}_attentions_{index}"
    if output_block is not None:
        level, index = divmod(int(output_block), per_level)
        return f"up_blocks_{level}_attentions_{index}"
    return "mid_block_attentions_0"


def renamed(lora: dict[str, torch.Tensor], arch: str | None) -> dict[str, torch.Tensor]:
    """`lora` with every module named as kohya's sd-scripts names it for `arch`; the
    tensors are the same objects."""
    out = {}
    for key, tensor in lora.items():
        module, dot, part = key.partition(".")
        out[module_name(module, arch) + dot + part] = tensor
    return out


def header(ranks: list[tuple[int, float]], arch: str | None, comment: str, implementation: str) -> dict[str, str]:
    """The kohya `ss_*` fields and `modelspec.implementation` of a LoRA file whose modules
    have these (rank, alpha), with `comment` as its training comment.

    A module's scale is alpha / rank; the pack writes alpha = rank (scale 1), so the largest
    rank and its alpha say it. Fields about a training run (images, epochs, optimiser) are
    left out: a forget patch had none of those."""
    rank, alpha = max(ranks)
    fields = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_training_comment": comment,
        "modelspec.implementation": implementation,
    }
    family = FAMILIES.get(arch or "")
    if family is not None:
        fields["ss_base_model_version"] = family.version
        fields["ss_v2"] = str(family.v2)
    return fields


def implementation(arch: str | None, host_names: bool) -> str:
    """Whose module names a file follows: the host's own (`host_names`: a gated patch's
    layers, a text encoder's generic names), the diffusers UNet's or the SGM UNet's."""
    if host_names:
        return IMPL_COMFYUI
    family = FAMILIES.get(arch or "")
    return IMPL_DIFFUSERS if family is not None and family.diffusers_names else IMPL_SGM
