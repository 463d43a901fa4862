"""The nodes as ComfyUI runs them: under inference_mode, on real host objects."""
import pytest
import torch

import comfy.model_management as mm
import comfy.sample
import folder_paths
import host_models as hm
from attention_checks import RESOLUTION
from leak_checks import host_state
from fmn_pack.fmn_core import host
from fmn_pack.fmn_core.attention import ColumnEnergy, attention_probs, make_attn2_replace
from fmn_pack.fmn_core.patch import load_patch
from fmn_pack.nodes import NODE_CLASS_MAPPINGS as NODES

TRAIN = NODES["FMN_ForgetTrain"]


def run_train(model, clip, concepts="van gogh | style", steps=3, **optional):
    with torch.inference_mode():
        return TRAIN().train(model, clip, concepts, steps, 1e-2, 2, 0, resolution=RESOLUTION, **optional)["result"]


def sample(model, clip, seed=5):
    """A real host sampling run (2 euler steps) of `model`, for bit-identity checks."""
    with torch.inference_mode():
        cond = [[host.encode(clip, "a house by a lake"), {}]]
        latent = torch.zeros(1, 4, RESOLUTION // 8, RESOLUTION // 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", cond, cond, latent, seed=seed)


@pytest.fixture(scope="module")
def sd1():
    return hm.sd15_model(seed=7), hm.sd1_clip()


def test_forget_train_leaves_the_input_model_untouched(sd1):
    model, clip = sd1
    state, before = host_state(model), sample(model, clip)
    patched, patch, plot, patched_clip, *_ = run_train(model, clip)
    assert patched_clip is clip  # an aimed patch has no text-encoder side: the CLIP passes through
    assert host_state(model) == state
    assert torch.equal(sample(model, clip), before)
    assert not torch.equal(sample(patched, clip), before)
    assert patch.concepts == ["van gogh"] and len(patched.patches) == 32
    assert plot.shape == (1, 256, 512, 3) and 0 <= plot.min() < plot.max() <= 1


def test_interrupt_stops_training_and_changes_nothing(sd1):
    model, clip = sd1
    state, before = host_state(model), sample(model, clip)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_train(model, clip, steps=50)
    finally:
        mm.interrupt_current_processing(False)
    assert host_state(model) == state
    assert torch.equal(sample(model, clip), before)


def test_diverging_loss_stops_with_an_error_and_no_patch(sd1):
    model, clip = sd1
    state = host_state(model)
    latent = {"samples": torch.full((1, 4, 8, 8), float("nan"))}
    with pytest.raises(RuntimeError, match="diverged at step 1.*no patch was produced"):
        run_train(model, clip, latent=latent)
    assert host_state(model) == state


def test_images_need_a_vae(sd1):
    with pytest.raises(ValueError, match="connect the model's VAE"):
        run_train(*sd1, images=torch.zeros(1, 64, 64, 3))


def test_training_from_latents_per_concept(sd1):
    model, clip = sd1
    latent = {"samples": torch.randn(4, 4, RESOLUTION // 8, RESOLUTION // 8, generator=torch.Generator().manual_seed(0))}
    _, patch, *_ = run_train(model, clip, "van gogh | style | images=0-1\nred fox | images=2-3", latent=latent)
    assert patch.concepts == ["van gogh", "red fox"]
    with pytest.raises(ValueError, match="asks for images 2-9 but only 4 were given"):
        run_train(model, clip, "red fox | images=2-9", latent=latent)


@pytest.mark.parametrize("text, message", [
    ("", "no concepts given"),
    ("  \n# only a comment\n", "no concepts given"),
    ("van gogh | painterly", "unknown category 'painterly'"),
    ("| style", "has no concept"),
    ("Van Gogh | style | anchor=van gogh", "is the concept itself"),
])
def test_concept_list_validation(text, message):
    assert message in TRAIN.VALIDATE_INPUTS(concepts=text)


def test_steps_below_one_are_refused(sd1):
    with pytest.raises(ValueError, match="steps must be at least 1"):
        run_train(*sd1, steps=0)
    assert TRAIN.INPUT_TYPES()["required"]["steps"][1]["min"] == 1


def test_chains_to_another_packs_attn2_replace(sd1):
    """An IP-adapter-like replace registered before ours keeps producing the output."""
    model, clip = sd1
    calls = []

    def other_pack(q, k, v, extra_options):
        calls.append(extra_options["block"])
        heads = extra_options["n_heads"]
        probs = attention_probs(q, k, heads)
        b, n, _ = q.shape
        vh = v.reshape(v.shape[0], -1, heads, v.shape[-1] // heads).transpose(1, 2)
        return (probs @ vh).transpose(1, 2).reshape(b, n, -1) * 0.5

    other = model.clone()
    for layer in host.attn2_layers(model):
        other.set_model_attn2_replace(other_pack, *layer.block[:2])
    _, patch, *_ = run_train(other, clip, steps=2)
    assert len(calls) >= 2 * 16
    ours = make_attn2_replace("x", lambda *a: None, other_pack)
    q, k, v = torch.randn(1, 4, 16), torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    options = {"n_heads": 2, "block": ("input", 1)}
    assert torch.equal(ours(q, k, v, options), other_pack(q, k, v, options))


def test_batch_masks_follow_the_host_head_order(sd1):
    """The loss of a batch equals the losses of its samples taken alone, with different masks."""
    model, clip = sd1
    contexts = [host.encode(clip, p) for p in ("a photo of van gogh", "a red fox in the snow at night")]
    masks = [torch.zeros(1, 77), torch.zeros(1, 77)]
    masks[0][0, 4:6] = 1
    masks[1][0, 2:4] = 1
    sink = ColumnEnergy()
    clone = model.clone()
    host.register_attn2(clone, host.attn2_layers(model), lambda layer, prev: make_attn2_replace(layer.module, sink, prev))
    forward = host.loaded_forward(clone)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([3.0, 3.0])

    def energy(idx):
        sink.reset(torch.cat([masks[i] for i in idx]))
        with torch.no_grad():
            forward(x[idx], sigma[idx], torch.cat([contexts[i] for i in idx]))
        return float(sink.sum_squares)

    together, alone = energy([0, 1]), energy([0]) + energy([1])
    assert together == pytest.approx(alone, rel=1e-5)
    swapped = [masks[1], masks[0]]
    masks[:] = swapped
    assert energy([0, 1]) != pytest.approx(together, rel=1e-3)


def test_save_node_stays_in_its_folder_and_the_loader_lists_it(sd1, tmp_path):
    _, patch, *_ = run_train(*sd1, steps=2)
    folder_paths.folder_names_and_paths["forget_patches"] = ([str(tmp_path)], {".safetensors"})
    save = NODES["FMN_SaveForgetPatch"]()
    names = ["../../escape", "/etc/passwd", "CON", "a/b\\c", "x" * 300, "fine name.safetensors"]
    for name in names:
        save.save(patch, name, False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == len(names) and all(p.parent == tmp_path for p in tmp_path.iterdir())
    assert "fine name.safetensors" in files and "_CON.safetensors" in files
    listed = NODES["FMN_LoadForgetPatch"].INPUT_TYPES()["required"]["patch_name"][0]
    assert sorted(listed) == files
    with pytest.raises(FileExistsError):
        save.save(patch, "fine name", False)
    assert load_patch(tmp_path / "fine name.safetensors").concepts == ["van gogh"]
    with pytest.raises(ValueError, match="no usable characters"):
        save.save(patch, "..", False)


def test_token_rows_mode_patches_the_clip_and_apply_needs_it(sd1):
    """Mode 'token rows' leaves the UNet alone and edits the CLIP: Forget Train's clip
    output, and Apply Forget Patch's when its clip input is connected; without it, a clear error."""
    model, clip = sd1
    clip_state = host_state(clip.patcher)
    patched, patch, _, patched_clip, *_ = run_train(model, clip, steps=3, mode="token rows")
    prompt, other = "a painting by van gogh", "a house by a lake"
    assert patched.patches == {} and torch.equal(sample(patched, clip), sample(model, clip))
    assert not torch.equal(host.encode(patched_clip, prompt), host.encode(clip, prompt))
    assert torch.equal(host.encode(patched_clip, other), host.encode(clip, other))
    apply = NODES["FMN_ApplyForgetPatch"]()
    with torch.inference_mode():
        _, applied_clip = apply.apply(model, patch, 1.0, clip=clip)["result"]
    assert torch.equal(host.encode(applied_clip, prompt), host.encode(patched_clip, prompt))
    assert host_state(clip.patcher) == clip_state
    with pytest.raises(ValueError, match="connect the CLIP to Apply Forget Patch"):
        apply.apply(model, patch, 1.0)
