"""A forget patch loads wherever LoRAs load: diffusers' default `load_lora_weights(path)`
(with peft) on small SD1-, SD2- and SDXL-layout pipelines built from configs
(`diffusers_models.py`), A1111's name rules, and ComfyUI's stock loader, which must give
the same weights for the kohya naming files now use as for the host naming earlier
versions wrote. The patches are written by the pack: `export_kohya` and `save_patch`, as
Forget Train's output is, and once by the Forget Train and Save Forget Patch nodes on
ToyBench, as `make demo` runs them."""
import json
import re

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file

import comfy.model_management
import comfy.utils
import diffusers_models as dm
import folder_paths
import host_models as hm
import nodes as host_nodes
from fmn_pack.fmn_core import gate, host
from fmn_pack.fmn_core.lora import LowRankDelta, export_kohya
from fmn_pack.fmn_core.merge import merge_patches
from fmn_pack.fmn_core.patch import ForgetPatch, apply_patch, kohya_named, load_patch, model_card, save_patch
from fmn_pack.nodes import NODE_CLASS_MAPPINGS as NODES

RANK = 4  # of every module of the patches written here
MODELS = {"SD15": hm.sd15_model, "SD20": hm.sd2_model, "SDXL": hm.sdxl_model}
PIPELINES = {"SD15": lambda: dm.sd_pipeline(hm.SD15_UNET), "SD20": lambda: dm.sd_pipeline(hm.SD2_UNET),
             "SDXL": dm.sdxl_pipeline}
# kohya's sd-scripts names SD1.x/2.x modules by the diffusers UNet, SDXL ones by the SGM UNet.
KOHYA_BLOCKS = {"SD15": r"(down_blocks|mid_block|up_blocks)_", "SD20": r"(down_blocks|mid_block|up_blocks)_",
                "SDXL": r"(input_blocks|middle_block|output_blocks)_"}
SS_FIELDS = {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2",
             "ss_training_comment"}


def attn2_keys(model) -> list[str]:
    """Every attn2 to_k and to_v weight: what a forget patch of the default mode edits."""
    return [layer.weight_key(p) for layer in host.attn2_layers(model) for p in ("to_k", "to_v")]


def transformer_keys(model) -> list[str]:
    """Every linear weight in the UNet's transformer blocks: what a hardening patch edits."""
    return [f"{name}.weight" for name, module in model.model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".transformer_blocks." in name]


def pack_patch(model, arch: str, keys: list[str] | None = None) -> ForgetPatch:
    """A patch as Forget Train exports it (`export_kohya` of a rank-4 update of each of
    `keys`, attn2 to_k and to_v by default, and the header's card), with random factors in
    place of trained ones."""
    generator = torch.Generator().manual_seed(0)
    deltas = {}
    for key, (out_features, in_features) in host.weight_shapes(model, keys or attn2_keys(model)).items():
        deltas[key] = LowRankDelta.free(out_features, in_features, RANK, 1.0, generator)
        with torch.no_grad():
            deltas[key].up.normal_(std=0.1, generator=generator)
    metadata = {**model_card(arch, ["van gogh"], ["style"], 0, "aimed k/v"), "fmn.base_arch": arch,
                "fmn.concepts": json.dumps(["van gogh"]), "fmn.categories": json.dumps(["style"]),
                "fmn.context_dim": str(host.attn2_layers(model)[0].context_dim), "fmn.rank": str(RANK)}
    return ForgetPatch(export_kohya(deltas), metadata)


@pytest.fixture(scope="module", params=sorted(MODELS))
def written(request, tmp_path_factory):
    """(architecture, model, in-memory patch, its file written by save_patch)."""
    arch = request.param
    model = MODELS[arch]()
    patch = pack_patch(model, arch)
    return arch, model, patch, save_patch(patch, tmp_path_factory.mktemp(arch) / "forget.safetensors")


def unet_weights(patcher) -> dict[str, torch.Tensor]:
    comfy.model_management.load_models_gpu([patcher])
    return {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def stock_weights(model, path, monkeypatch) -> dict[str, torch.Tensor]:
    """The UNet after ComfyUI's stock LoraLoaderModelOnly applies the file at strength 1."""
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(path.parent)], {".safetensors"}))
    return unet_weights(host_nodes.LoraLoaderModelOnly().load_lora_model_only(model, path.name, 1.0)[0])


def diffusers_names(model, keys: list[str]) -> dict[str, str]:
    """diffusers module name -> the host's weight key, for each of `keys`, by the host's own
    map between the two layouts."""
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    wanted = {key[len("diffusion_model."):] for key in keys}
    return {k[: -len(".weight")]: v for k, v in mapping.items() if v in wanted}


def diffusers_load(pipe, path, base: dict[str, torch.Tensor], names: dict[str, str]) -> tuple[set[str], dict]:
    """Load the file with the default call into `pipe`, whose modules `names` first get the
    host model's weights; the modules peft wrapped, and those weights after fusing."""
    with torch.no_grad():
        for name, key in names.items():
            pipe.unet.get_submodule(name).weight.copy_(base[key])
    pipe.load_lora_weights(str(path))
    wrapped = {n for n, m in pipe.unet.named_modules() if isinstance(m, BaseTunerLayer)}
    pipe.fuse_lora()
    return wrapped, {name: pipe.unet.get_submodule(name).weight.detach().clone() for name in names}


def test_the_file_names_modules_as_kohya_does_and_holds_the_same_tensors(written):
    """The same tensors under kohya's names, matched to the patch's own through the host's key map."""
    arch, model, patch, path = written
    loaded, key_map = load_patch(path), host.lora_key_map(model)
    assert all(re.match(rf"lora_unet_{KOHYA_BLOCKS[arch]}.*_attn2_to_[kv]$", m) for m in loaded.modules()), \
        loaded.modules()[:2]
    own = {key_map[m]: m for m in patch.modules()}
    assert sorted(own) == sorted(key_map[m] for m in loaded.modules())
    for module in loaded.modules():
        for part in (".lora_up.weight", ".lora_down.weight", ".alpha"):
            assert torch.equal(loaded.lora[module + part], patch.lora[own[key_map[module]] + part])


def test_diffusers_default_load_reads_every_module_and_gives_comfyuis_weights(written, monkeypatch):
    """`pipe.load_lora_weights(path)`, no other argument: every attn2 module is wrapped, and
    the fused weights equal those ComfyUI's stock loader gives on the same file."""
    arch, model, patch, path = written
    check_diffusers_load(arch, model, patch, path, attn2_keys(model), monkeypatch)


@pytest.mark.parametrize("arch", ["SD15", "SDXL"])
def test_a_hardening_patch_loads_in_diffusers_too(arch, tmp_path, monkeypatch):
    """Harden Forget Patch's layout: every linear layer of the transformer blocks (attn1,
    attn2, feed-forward), one architecture of each naming."""
    model = MODELS[arch]()
    keys = transformer_keys(model)
    patch = pack_patch(model, arch, keys)
    check_diffusers_load(arch, model, patch, save_patch(patch, tmp_path / "harden.safetensors"), keys, monkeypatch)


def check_diffusers_load(arch: str, model, patch: ForgetPatch, path, keys: list[str], monkeypatch) -> None:
    """The default call wraps exactly the patch's modules, and fused they hold the weights
    ComfyUI's stock loader gives (which differ from the model's own)."""
    names = diffusers_names(model, keys)
    base, stock = unet_weights(model), stock_weights(model, path, monkeypatch)
    wrapped, fused = diffusers_load(PIPELINES[arch](), path, base, names)
    assert len(names) == len(keys) and wrapped == set(names) and len(wrapped) == len(patch.modules())
    assert all(torch.equal(fused[name], stock[key]) for name, key in names.items())
    assert not any(torch.equal(base[key], stock[key]) for key in names.values())


@pytest.mark.parametrize("arch", ["SD15", "SD20"])
def test_comfyui_gives_the_same_weights_for_both_namings(arch, tmp_path, monkeypatch):
    """Bit for bit: the stock loader on the new file and on the file an earlier version
    wrote (the host's names), and Apply Forget Patch on the old file."""
    model = MODELS[arch]()
    patch = pack_patch(model, arch)
    new = save_patch(patch, tmp_path / "new.safetensors")
    old = tmp_path / "old.safetensors"
    save_file(patch.lora, str(old), metadata=patch.metadata)
    assert set(load_patch(new).lora) != set(load_patch(old).lora)
    from_new, from_old = stock_weights(model, new, monkeypatch), stock_weights(model, old, monkeypatch)
    ours = unet_weights(apply_patch(model, load_patch(old), 1.0))
    assert all(torch.equal(from_new[k], from_old[k]) and torch.equal(from_new[k], ours[k]) for k in from_new)


def test_merging_an_old_and_a_new_file_is_merging_the_new_twice(tmp_path):
    """Merge matches layers across namings and writes the kohya naming."""
    model, clip = hm.sd15_model(), hm.sd1_clip()
    patch = pack_patch(model, "SD15")
    new = load_patch(save_patch(patch, tmp_path / "new.safetensors"))
    save_file(patch.lora, str(tmp_path / "old.safetensors"), metadata=patch.metadata)
    old = load_patch(tmp_path / "old.safetensors")
    with torch.inference_mode():
        mixed, same = merge_patches(clip, [old, new]), merge_patches(clip, [new, new])
    assert sorted(mixed.lora) == sorted(same.lora) and len(mixed.modules()) == 32
    assert all(re.match(rf"lora_unet_{KOHYA_BLOCKS['SD15']}", m) for m in mixed.modules())
    assert all(torch.equal(mixed.lora[k], same.lora[k]) for k in same.lora)


def test_a_file_holding_one_layer_under_both_namings_is_refused(tmp_path):
    """A LoRA loader would apply such a layer twice; merge and save would keep it once."""
    patch = pack_patch(hm.sd15_model(), "SD15")
    renamed = {k: v.clone() for k, v in kohya_named(patch).lora.items()}
    save_file({**patch.lora, **renamed}, str(tmp_path / "both.safetensors"), metadata=patch.metadata)
    with pytest.raises(ValueError, match="lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k and "
                                         "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k name the same "
                                         "layer"):
        load_patch(tmp_path / "both.safetensors")


def a1111_module(name: str) -> str:
    """The module A1111's built-in Lora extension applies a LoRA module to, as written out
    in its `extensions-builtin/Lora/networks.py` (1.x): `convert_diffusers_name_to_compvis`
    for diffusers block names (SD1.x/2.x: 3 SGM blocks per level), else `load_network`'s
    fallback `lora_unet` -> `diffusion_model` (SDXL's names). Transformer modules only."""
    down = re.match(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)", name)
    if down:
        return f"diffusion_model_input_blocks_{1 + int(down[1]) * 3 + int(down[2])}_1_{down[3]}"
    middle = re.match(r"lora_unet_mid_block_attentions_(\d+)_(.+)", name)
    if middle:
        return f"diffusion_model_middle_block_1_{middle[2]}"
    up = re.match(r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)", name)
    if up:
        return f"diffusion_model_output_blocks_{int(up[1]) * 3 + int(up[2])}_1_{up[3]}"
    return name.replace("lora_unet", "diffusion_model", 1)


def test_a1111_name_rules_find_every_module_where_comfyui_does(written):
    """A1111 looks each name up among the model's modules, dots written as '_'."""
    _, model, _, path = written
    modules = {n.replace(".", "_"): n for n, _ in model.model.named_modules()}
    key_map = host.lora_key_map(model)
    for module in load_patch(path).modules():
        assert f"{modules[a1111_module(module)]}.weight" == key_map[module], module


def test_the_header_carries_the_fields_lora_tools_read(written):
    arch, _, patch, path = written
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    version = {"SD15": "sd_v1", "SD20": "sd_v2", "SDXL": "sdxl_base_v1-0"}[arch]
    assert {k for k in meta if k.startswith("ss_")} == SS_FIELDS  # nothing about a training run it did not have
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "4", "4")
    assert meta["ss_base_model_version"] == version and meta["ss_v2"] == str(arch == "SD20")
    comment = meta["ss_training_comment"]
    assert "van gogh (style)" in comment and "not by kohya's sd-scripts" in comment
    assert meta["modelspec.implementation"] == ("https://github.com/Stability-AI/generative-models" if arch == "SDXL"
                                                else "diffusers")
    assert meta["modelspec.architecture"].endswith("/lora") and meta["modelspec.title"] == "Forget van gogh"
    assert "van gogh" in meta["modelspec.description"]
    assert {k: v for k, v in meta.items() if k.startswith("fmn.")} == {k: v for k, v in patch.metadata.items()
                                                                     if k.startswith("fmn.")}


def test_a_gated_patch_claims_no_lora_fields(tmp_path):
    """A gated patch is not a LoRA: no ss_* fields, and its layout is the host's."""
    model = hm.sd15_model()
    layers = host.attn2_layers(model)
    concept_gate = gate.ConceptGate(torch.nn.functional.normalize(torch.randn(2, 768), dim=-1), 0.2, 0.6)
    tensors, fields = gate.to_file(gate.key_input_edits(layers, 2, torch.Generator().manual_seed(0)), concept_gate)
    card = model_card("SD15", ["van gogh"], ["style"], 0, "gated k", gated=True)
    path = save_patch(ForgetPatch(tensors, {**card, **fields, "fmn.base_arch": "SD15"}), tmp_path / "gated.safetensors")
    loaded = load_patch(path)
    assert sorted(loaded.lora) == sorted(tensors)
    assert not [k for k in loaded.metadata if k.startswith("ss_")]
    assert loaded.metadata["modelspec.implementation"] == "https://github.com/comfyanonymous/ComfyUI"


def test_a_demo_patch_loads_in_a_toy_layout_diffusers_pipeline(tmp_path, monkeypatch):
    """`make demo`'s path: Load ToyBench, Forget Train (forget_concept.json's settings at
    the demo's 32 px, fewer steps) and Save Forget Patch, as nodes; then the default
    diffusers call on a pipeline of ToyBench's UNet layout."""
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "forget_patches", ([str(tmp_path)], {".safetensors"}))
    with torch.inference_mode():
        model, clip, _ = NODES["FMN_LoadToyBench"]().load()
        _, patch, *_ = NODES["FMN_ForgetTrain"]().train(model, clip, "star | object", 4, 0.1, 4, 0, resolution=32)["result"]
        NODES["FMN_SaveForgetPatch"]().save(patch, "toy_star", False)
    path = tmp_path / "toy_star.safetensors"
    names = diffusers_names(model, attn2_keys(model))
    base, stock = unet_weights(model), stock_weights(model, path, monkeypatch)
    wrapped, fused = diffusers_load(dm.sd_pipeline(model.model.model_config.unet_config), path, base, names)
    assert len(wrapped) == len(load_patch(path).modules()) == 32 and wrapped == set(names)
    assert all(torch.equal(fused[name], stock[key]) for name, key in names.items())
    assert any(not torch.equal(base[key], stock[key]) for key in names.values())
