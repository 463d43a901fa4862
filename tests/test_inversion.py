"""Concept Inversion and M-Score on small SD1/SD2-layout models built from the host's classes."""
import pytest
import torch
from safetensors.torch import load_file

import comfy.model_management
import host_models as hm
from attention_checks import RESOLUTION, concept_share_ratio
from fmn_pack.fmn_core import host
from fmn_pack.fmn_core.concepts import parse_concepts
from fmn_pack.fmn_core.embedding import Embedding, save_embedding
from fmn_pack.fmn_core.inversion import InversionConfig, Prompts, initial_rows, invert
from fmn_pack.fmn_core.mscore import m_scores
from fmn_pack.fmn_core.text_encoder import TextEncoders
from fmn_pack.fmn_core.train import ForgetConfig, forget

SMALL = InversionConfig(num_tokens=3, steps=12, learning_rate=5e-2, seed=7, batch_size=2)


def latents(seed: int = 0, count: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((count, 4, RESOLUTION // 8, RESOLUTION // 8), generator=g)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    return hm.sd15_model(), hm.sd1_clip(embedding_directory=str(folder)), folder


@pytest.mark.parametrize("layout", ["sd1", "sd2"])
@pytest.mark.parametrize("clip_skip", [None, -2])
def test_out_of_place_text_encoder_matches_the_host_and_has_gradients(layout, clip_skip, tmp_path):
    clip = (hm.sd1_clip if layout == "sd1" else hm.sd2_clip)(embedding_directory=str(tmp_path))
    if clip_skip is not None:
        clip.clip_layer(clip_skip)
    with torch.inference_mode():  # as a node runs: the host's weights are inference tensors
        encoder = TextEncoders(host.text_encoder_specs(clip))
        rows = torch.randn((3, encoder.width), generator=torch.Generator().manual_seed(0))
        save_embedding(Embedding("probe", rows, encoder.layout), tmp_path / "probe.safetensors")
        expected, expected_pooled = clip.encode_from_tokens(clip.tokenize("a photo of embedding:probe on a hill"),
                                                            return_pooled=True)
    with torch.inference_mode(False):
        trainable = rows.clone().requires_grad_(True)
        ours, pooled = Prompts(clip, ("a photo of {} on a hill",)).encode(encoder, trainable, [0])
        ours.square().sum().backward()
    torch.testing.assert_close(ours.detach(), expected.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled.detach(), expected_pooled.float(), rtol=1e-5, atol=1e-5)
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0


def test_inversion_trains_only_the_new_rows_and_the_file_loads_as_an_embedding(sd1):
    model, clip, folder = sd1
    comfy.model_management.load_models_gpu([model])
    unet_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    clip_before = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    with torch.inference_mode():
        result = invert(model, clip, latents(), "van gogh", SMALL)
    assert result.vectors.shape == (3, 768) and result.layout == (("clip_l", 768),)
    assert not torch.equal(result.vectors, result.initial), "the new rows did not move"
    for before, module in ((unet_before, model.model), (clip_before, clip.cond_stage_model)):
        after = module.state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert not changed, f"inversion changed host weights: {changed[:3]}"
    path = save_embedding(Embedding("vg", result.vectors, result.layout), folder / "vg.safetensors")
    assert set(load_file(str(path))) == {"clip_l"}
    with torch.inference_mode():
        with_embedding = clip.encode_from_tokens(clip.tokenize("a photo of embedding:vg"))
        plain = clip.encode_from_tokens(clip.tokenize("a photo of"))
        encoder = TextEncoders(host.text_encoder_specs(clip))
    assert (with_embedding - plain).abs().max() > 0.1, "embedding:vg did not change the conditioning"
    ours = Prompts(clip, ("a photo of {}",)).encode(encoder, result.vectors, [0])[0]
    torch.testing.assert_close(ours, with_embedding.float(), rtol=1e-5, atol=1e-5)


def test_initial_rows_come_from_the_concept_words():
    words = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(initial_rows(words, 4), words[[0, 1, 2, 0]])
    assert torch.equal(initial_rows(words, 2), torch.stack([words[:2].mean(0), words[2]]))


def test_forget_train_targets_exactly_the_embedding_tokens(sd1):
    model, clip, folder = sd1
    rows = torch.randn((2, 768), generator=torch.Generator().manual_seed(3)) * 0.5
    save_embedding(Embedding("target", rows, (("clip_l", 768),)), folder / "target.safetensors", overwrite=True)
    config = ForgetConfig(resolution=RESOLUTION, steps=35, learning_rate=1e-2, rank=2, output_weight=0.0)
    with torch.inference_mode():
        result = forget(model, clip, parse_concepts("embedding:target | style"), config)
        patched = host.apply_lora(model, result.lora, 1.0)
        ratio = concept_share_ratio(model, patched, clip, "embedding:target")
    assert ratio <= 0.5, f"attention on the embedding's tokens only fell to {ratio:.2f} of before"


def test_m_score_is_deterministic_for_a_fixed_seed(sd1):
    model, clip, _ = sd1
    with torch.inference_mode():
        first = m_scores([("original", model)], clip, latents(), "van gogh", SMALL, "painter")
        second = m_scores([("original", model)], clip, latents(), "van gogh", SMALL, "painter")
    assert first == second
    assert -1 <= first[0].score <= 1 and first[0].drop == 0


def test_m_score_refuses_models_of_different_architectures(sd1):
    model, clip, _ = sd1
    with torch.inference_mode(), pytest.raises(ValueError, match="one architecture"):
        m_scores([("original", model), ("sd2", hm.sd2_model())], clip, latents(), "van gogh", SMALL, "painter")


@pytest.mark.parametrize("change, message", [
    ({"num_tokens": 0}, "num_tokens must be at least 1"),
    ({"templates": ("a photo of",)}, "exactly one {}"),
    ({"steps": 0}, "steps must be at least 1"),
])
def test_bad_inversion_settings_are_refused(sd1, change, message):
    model, clip, _ = sd1
    config = InversionConfig(**{**SMALL.__dict__, **change})
    with torch.inference_mode(), pytest.raises(ValueError, match=message):
        invert(model, clip, latents(), "van gogh", config)


# --- the nodes, as ComfyUI runs them ---------------------------------------------------

from fmn_pack.nodes import NODE_CLASS_MAPPINGS as NODES  # noqa: E402


def run_inversion(model, clip, name, **optional):
    node = NODES["FMN_ConceptInversion"]()
    with torch.inference_mode():
        return node.invert(model, clip, "van gogh", name, 2, 3, 1e-2, 0, latent={"samples": latents()}, **optional)


def test_inversion_node_saves_inside_the_embeddings_folder_and_never_overwrites_by_accident(sd1, embeddings_folder):
    model, clip, _ = sd1
    out = run_inversion(model, clip, "../escape")
    files = list(embeddings_folder.iterdir())
    assert [f.name for f in files] == ["_escape.safetensors"] and out["result"][1] == "embedding:_escape"
    saved = files[0].read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        run_inversion(model, clip, "_escape")
    assert files[0].read_bytes() == saved
    run_inversion(model, clip, "_escape", overwrite=True, templates="a painting of {}")
    assert files[0].read_bytes() != saved and len(list(embeddings_folder.iterdir())) == 1


def test_interrupted_inversion_writes_no_file(sd1, embeddings_folder):
    model, clip, _ = sd1
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_inversion(model, clip, "never")
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert list(embeddings_folder.iterdir()) == []


def test_inversion_node_validates_its_inputs():
    validate = NODES["FMN_ConceptInversion"].VALIDATE_INPUTS
    assert "exactly one {}" in validate(name="ok", templates="a photo of")
    assert "no usable characters" in validate(name="../..", templates="a photo of {}")
    assert validate(name="ok", templates="a photo of {}\n\na painting of {}") is True


def test_m_score_node_reports_every_model(sd1):
    model, clip, _ = sd1
    config = ForgetConfig(resolution=RESOLUTION, steps=10, learning_rate=1e-2, rank=2)
    with torch.inference_mode():
        patched = host.apply_lora(model, forget(model, clip, parse_concepts("van gogh | style"), config).lora, 1.0)
        out = NODES["FMN_MScore"]().score(model, clip, "van gogh", "painter", 2, 4, 1e-2, 0, patched=patched, patched_2=patched,
                                          latent={"samples": latents()})
    original, after, drop, report = out["result"]
    assert drop == pytest.approx(original - after, abs=1e-5)
    assert report.count("| patched") == 2 and "seed 0" in report and out["ui"]["text"] == [report]
