"""Forget patches: file format, stock-loader equivalence, stacking and refusals."""
import base64
import io
import json

import pytest
import torch
from safetensors.torch import save_file

import comfy.model_management
import folder_paths
import host_models as hm
from hostile_files import trap_pickle
import nodes as host_nodes
from fmn_pack.fmn_core import host
from fmn_pack.fmn_core.concepts import parse_concepts
from fmn_pack.fmn_core.patch import COVER_SIZE, ForgetPatch, apply_patch, kohya_named, load_patch, save_patch, with_cover
from fmn_pack.fmn_core.train import ForgetConfig, forget


def make_patch(model, clip, concept="van gogh | style", steps=4):
    result = forget(model, clip, parse_concepts(concept), ForgetConfig(steps=steps, resolution=64))
    return ForgetPatch(result.lora, result.metadata)


def unet_weights(patcher):
    comfy.model_management.load_models_gpu([patcher])
    return {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


@pytest.fixture(scope="module")
def sd1():
    return hm.sd15_model(), hm.sd1_clip()


@pytest.fixture(scope="module")
def patch(sd1):
    return make_patch(*sd1)


def test_file_is_kohya_lora_with_metadata_and_no_embeddings(sd1, patch, tmp_path):
    path = save_patch(patch, tmp_path / "p.safetensors")
    loaded = load_patch(path)
    assert all(k.startswith("lora_unet_") and "_attn2_to_" in k for k in loaded.lora)
    assert len(loaded.modules()) == 32
    meta = loaded.metadata
    assert json.loads(meta["fmn.concepts"]) == ["van gogh"] and json.loads(meta["fmn.categories"]) == ["style"]
    assert meta["fmn.base_arch"] == "SD15" and len(meta["fmn.base_fingerprint"]) == 16
    assert meta["fmn.rank"] == "6" and meta["fmn.steps"] == "4" and meta["fmn.learning_rate"] and meta["fmn.pack_version"]
    assert all(t.ndim == 2 or t.numel() == 1 for t in loaded.lora.values())
    named = kohya_named(patch).lora  # the file names modules as kohya does (test_lora_interop.py)
    assert sorted(loaded.lora) == sorted(named) and all(torch.equal(loaded.lora[k], named[k]) for k in named)


def test_header_carries_a_model_card_and_an_optional_cover(patch, tmp_path):
    """What the Model Library shows: modelspec title, architecture, description, and a
    cover picture only when one is given (the patch it was added to stays as it was)."""
    from PIL import Image
    meta = patch.metadata
    assert meta["modelspec.title"] == "Forget van gogh"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert "van gogh (style)" in meta["modelspec.description"] and "4 steps" in meta["modelspec.description"]
    assert "modelspec.thumbnail" not in meta
    image = torch.zeros(2, 600, 300, 3)
    image[0, :300] = torch.tensor([1.0, 0.5, 0.0])
    covered = load_patch(save_patch(with_cover(patch, image), tmp_path / "covered.safetensors"))
    assert "modelspec.thumbnail" not in patch.metadata
    kind, _, data = covered.metadata["modelspec.thumbnail"].partition(",")
    assert kind == "data:image/png;base64"
    with Image.open(io.BytesIO(base64.b64decode(data))) as png:
        assert png.size == (COVER_SIZE // 2, COVER_SIZE)
        assert png.convert("RGB").getpixel((10, 10)) == (255, 128, 0) and png.convert("RGB").getpixel((10, 250)) == (0, 0, 0)


def test_stock_lora_loader_yields_the_same_weights(sd1, patch, tmp_path):
    model, _ = sd1
    save_patch(patch, tmp_path / "forget.safetensors")
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    stock = host_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "forget.safetensors", 0.7)[0]
    ours = apply_patch(model, load_patch(tmp_path / "forget.safetensors"), 0.7)
    stock_w, ours_w, base_w = unet_weights(stock), unet_weights(ours), unet_weights(model)
    assert all(torch.equal(stock_w[k], ours_w[k]) for k in base_w)
    assert any(not torch.equal(base_w[k], ours_w[k]) for k in base_w)


def test_stacking_adds_patches_and_leaves_inputs_alone(sd1, patch):
    model, clip = sd1
    second = make_patch(model, clip, "red fox")
    one = apply_patch(model, patch, 1.0)
    two = apply_patch(one, second, 1.0)
    assert model.patches == {} and len(one.patches) == 32
    key = next(iter(one.patches))
    assert len(two.patches[key]) == 2
    base, w1, w2 = unet_weights(model), unet_weights(one), unet_weights(two)
    k = key
    assert not torch.equal(w1[k[len("diffusion_model."):]], w2[k[len("diffusion_model."):]])
    assert all(torch.equal(base[n], w) for n, w in unet_weights(model).items())


def test_patch_for_another_architecture_is_refused(sd1):
    model, _ = sd1
    sd2_patch = make_patch(hm.sd2_model(), hm.sd2_clip(), steps=2)
    with pytest.raises(ValueError) as err:
        apply_patch(model, sd2_patch, 1.0)
    message = str(err.value)
    assert "made for SD20, the model is SD15" in message and "vs model weight" in message
    assert model.patches == {}


def test_rank_mismatch_is_listed(sd1, patch):
    model, _ = sd1
    tampered = ForgetPatch(dict(patch.lora), {**patch.metadata, "fmn.rank": "3"})
    with pytest.raises(ValueError, match="rank 6 vs the patch's declared rank 3; .*; and 27 more"):
        apply_patch(model, tampered, 1.0)
    key = next(k for k in patch.lora if k.endswith("lora_down.weight"))
    broken = ForgetPatch({**patch.lora, key: torch.zeros(3, 768, dtype=torch.float16)}, patch.metadata)
    with pytest.raises(ValueError, match="disagree on rank"):
        apply_patch(model, broken, 1.0)


@pytest.mark.parametrize("strength", [-11.0, 10.5])
def test_strength_out_of_range(sd1, patch, strength):
    with pytest.raises(ValueError, match="strength must be in"):
        apply_patch(sd1[0], patch, strength)


@pytest.mark.parametrize("name", ["evil.ckpt", "evil.safetensors"])
def test_pickles_are_never_unpickled(tmp_path, name):
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    path.write_bytes(trap_pickle(marker))
    with pytest.raises(ValueError, match="not a .safetensors file|corrupt or not safetensors|too short"):
        load_patch(path)
    assert not marker.exists()


def test_corrupt_and_truncated_files_are_refused(patch, tmp_path):
    good = save_patch(patch, tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="does not fit its data|corrupt"):
        load_patch(tmp_path / "cut.safetensors")
    save_file({"x.lora_up.weight": torch.ones(2, 2, dtype=torch.int32)}, str(tmp_path / "int.safetensors"))
    with pytest.raises(ValueError, match="dtype"):
        load_patch(tmp_path / "int.safetensors")
    save_file({"model.weight": torch.ones(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="unexpected keys"):
        load_patch(tmp_path / "other.safetensors")
    nan = {k: (v * float("nan") if k.endswith("lora_up.weight") else v) for k, v in patch.lora.items()}
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match="non-finite"):
        load_patch(tmp_path / "nan.safetensors")


def test_save_never_overwrites_unless_asked_and_leaves_no_partial_file(patch, tmp_path, monkeypatch):
    path = save_patch(patch, tmp_path / "p.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="enable overwrite"):
        save_patch(patch, path)
    import fmn_pack.fmn_core.patch as patch_module

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(patch_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_patch(patch, path, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]
