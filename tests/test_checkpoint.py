"""Save every N steps and resume: a run cancelled after a checkpoint and resumed from it
ends with exactly the patch an uninterrupted run with the same seed gives (ToyBench, CPU)."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fmn_pack.fmn_core.checkpoint import STATE_SUFFIX, Checkpoints, state_path
from fmn_pack.fmn_core.concepts import parse_concepts
from fmn_pack.fmn_core.patch import load_patch
from fmn_pack.fmn_core.train import ForgetConfig, forget
from fmn_pack.toybench import loader

CONFIG = ForgetConfig(steps=6, resolution=32)
CONCEPTS = parse_concepts("star | object")


class Cancelled(Exception):
    pass


class CancelAfter:
    """A progress callback that cancels the run once `steps` steps are done, as Cancel does."""

    def __init__(self, steps: int):
        self.left = steps

    def step(self) -> None:
        self.left -= 1
        if self.left <= 0:
            raise Cancelled


@pytest.fixture(scope="module")
def toy():
    return loader.load()


@pytest.fixture(scope="module")
def uninterrupted(toy):
    return forget(toy[0], toy[1], CONCEPTS, CONFIG)


def every(n: int, folder) -> Checkpoints:
    return Checkpoints(n, lambda step: folder / f"run_step{step}.safetensors")


def test_resume_ends_with_the_uninterrupted_runs_patch(toy, uninterrupted, tmp_path):
    with pytest.raises(Cancelled):
        forget(toy[0], toy[1], CONCEPTS, CONFIG, progress=CancelAfter(3), checkpoints=every(2, tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_step2.fmn-state", "run_step2.safetensors"]
    checkpoint = load_patch(tmp_path / "run_step2.safetensors")
    assert checkpoint.metadata["fmn.steps"] == "2" and len(json.loads(checkpoint.metadata["fmn.losses"])) == 2

    resumed = forget(toy[0], toy[1], CONCEPTS, CONFIG, resume=state_path(tmp_path / "run_step2.safetensors"))
    assert resumed.losses == uninterrupted.losses
    assert resumed.lora.keys() == uninterrupted.lora.keys()
    assert all(torch.equal(resumed.lora[k], uninterrupted.lora[k]) for k in uninterrupted.lora)
    assert resumed.metadata == uninterrupted.metadata


def test_a_longer_resume_continues_and_checkpoints_land_every_n(toy, uninterrupted, tmp_path):
    forget(toy[0], toy[1], CONCEPTS, replace(CONFIG, steps=4), checkpoints=every(2, tmp_path))
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["run_step2.safetensors"]
    resumed = forget(toy[0], toy[1], CONCEPTS, CONFIG, resume=state_path(tmp_path / "run_step2.safetensors"))
    assert resumed.losses == uninterrupted.losses


def test_resume_with_other_settings_or_past_the_end_is_refused(toy, tmp_path):
    forget(toy[0], toy[1], CONCEPTS, replace(CONFIG, steps=3), checkpoints=every(2, tmp_path))
    state = state_path(tmp_path / "run_step2.safetensors")
    with pytest.raises(ValueError, match="learning_rate: saved 0.1, now 0.05"):
        forget(toy[0], toy[1], CONCEPTS, replace(CONFIG, learning_rate=0.05), resume=state)
    with pytest.raises(ValueError, match="concepts"):
        forget(toy[0], toy[1], parse_concepts("moon | object"), CONFIG, resume=state)
    with pytest.raises(ValueError, match="at step 2 and steps is 2: raise steps"):
        forget(toy[0], toy[1], CONCEPTS, replace(CONFIG, steps=2), resume=state)
    with pytest.raises(FileNotFoundError, match="save_every"):
        forget(toy[0], toy[1], CONCEPTS, CONFIG, resume=tmp_path / f"missing{STATE_SUFFIX}")
    state.write_bytes(state.read_bytes()[:-8])
    with pytest.raises(ValueError, match="run_step2.fmn-state"):
        forget(toy[0], toy[1], CONCEPTS, CONFIG, resume=state)


def test_a_state_written_before_warm_start_and_negative_guidance_resumes_with_them_off(toy, tmp_path):
    """States of the first format lack the settings added since; they were trained with
    both off, so they resume with both off and are refused, by name, at the defaults."""
    then = replace(CONFIG, warm_start=False, negative_guidance=0.0)
    forget(toy[0], toy[1], CONCEPTS, replace(then, steps=4), checkpoints=every(2, tmp_path))
    state = state_path(tmp_path / "run_step2.safetensors")
    with safe_open(str(state), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    settings = json.loads(metadata["fmn.settings"])
    del settings["warm_start"], settings["negative_guidance"]
    save_file(tensors, state, metadata={**metadata, "fmn.settings": json.dumps(settings, sort_keys=True)})

    with pytest.raises(ValueError, match="negative_guidance: saved 0.0, now 0.5; warm_start: saved False, now True"):
        forget(toy[0], toy[1], CONCEPTS, CONFIG, resume=state)
    resumed = forget(toy[0], toy[1], CONCEPTS, then, resume=state)
    assert resumed.losses == forget(toy[0], toy[1], CONCEPTS, then).losses


def test_an_existing_checkpoint_is_refused_before_training(toy, tmp_path):
    (tmp_path / "run_step2.safetensors").write_bytes(b"someone's file")
    calls = CancelAfter(100)
    with pytest.raises(FileExistsError, match="run_step2.safetensors"):
        forget(toy[0], toy[1], CONCEPTS, CONFIG, progress=calls, checkpoints=every(2, tmp_path))
    assert calls.left == 100, "training started before the name clash was found"
    assert (tmp_path / "run_step2.safetensors").read_bytes() == b"someone's file"


def test_the_node_saves_checkpoints_offers_them_and_resumes(toy, tmp_path, monkeypatch):
    """Through Forget Train's own inputs: save_every writes <name>_step<N> into the patches
    folder, resume_from lists it (its state file is listed nowhere) and resumes it."""
    import folder_paths
    from fmn_pack.nodes import NODE_CLASS_MAPPINGS as NODES
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "forget_patches", ([str(tmp_path)], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})  # the host's listing cache would outlive the test
    node, train = NODES["FMN_ForgetTrain"], NODES["FMN_ForgetTrain"]().train
    whole = train(toy[0], toy[1], "star | object", 4, 0.1, 4, 0, resolution=32, save_every=2, checkpoint_name="ckpt")["result"][1]
    assert folder_paths.get_filename_list("forget_patches") == ["ckpt_step2.safetensors"]
    assert (tmp_path / "ckpt_step2.fmn-state").is_file()
    assert node.INPUT_TYPES()["optional"]["resume_from"][0] == ["none", "ckpt_step2.safetensors"]
    resumed = train(toy[0], toy[1], "star | object", 4, 0.1, 4, 0, resolution=32, resume_from="ckpt_step2.safetensors")["result"][1]
    assert all(torch.equal(resumed.lora[k], whole.lora[k]) for k in whole.lora) and resumed.metadata == whole.metadata


def test_an_inversion_resumed_from_its_checkpoint_ends_where_the_uninterrupted_one_does(toy, tmp_path):
    """Concept Inversion's save every N and resume: the same rows, losses and checkpoint
    embedding file (usable as embedding:<name>_step<N>) as for the patch above."""
    from fmn_pack.fmn_core.inversion import InversionConfig, invert
    from fmn_pack.fmn_core.safetensors_check import load_checked
    latents = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    config = InversionConfig(steps=5, batch_size=2, learning_rate=1e-2)
    whole = invert(toy[0], toy[1], latents, "thing", config)
    with pytest.raises(Cancelled):
        invert(toy[0], toy[1], latents, "thing", config, progress=CancelAfter(3), checkpoints=every(2, tmp_path))
    tensors, metadata = load_checked(tmp_path / "run_step2.safetensors", "embedding")
    assert [(key, t.shape) for key, t in tensors.items()] == [(key, whole.vectors.shape) for key, _ in whole.layout]
    assert metadata["fmn.steps"] == "2"
    resumed = invert(toy[0], toy[1], latents, "thing", config, resume=state_path(tmp_path / "run_step2.safetensors"))
    assert resumed.losses == whole.losses and torch.equal(resumed.vectors, whole.vectors)
    with pytest.raises(ValueError, match="init_text"):
        invert(toy[0], toy[1], latents, "person", config, resume=state_path(tmp_path / "run_step2.safetensors"))


def test_a_several_concept_run_resumes_exactly_too(toy, tmp_path):
    """Several concepts train with ColumnAdamW, whose step counts are one per column."""
    both = parse_concepts("star | object\nneon | style")
    whole = forget(toy[0], toy[1], both, CONFIG)
    with pytest.raises(Cancelled):
        forget(toy[0], toy[1], both, CONFIG, progress=CancelAfter(3), checkpoints=every(2, tmp_path))
    resumed = forget(toy[0], toy[1], both, CONFIG, resume=state_path(tmp_path / "run_step2.safetensors"))
    assert resumed.losses == whole.losses
    assert all(torch.equal(resumed.lora[k], whole.lora[k]) for k in whole.lora)


def test_a_resumed_runs_report_holds_the_checks_made_before_the_resume(toy, tmp_path):
    """The state file carries the check history, so the resumed run's report (node figure,
    patch header) shows every check of the run, as the uninterrupted run's does."""
    config = replace(CONFIG, check_every=2, target=0.0)
    whole = forget(toy[0], toy[1], CONCEPTS, config)
    with pytest.raises(Cancelled):
        forget(toy[0], toy[1], CONCEPTS, config, progress=CancelAfter(3), checkpoints=every(2, tmp_path))
    resumed = forget(toy[0], toy[1], CONCEPTS, config, resume=state_path(tmp_path / "run_step2.safetensors"))
    assert [h["step"] for h in whole.report.history] == [2, 4, 6]
    assert resumed.report.history == whole.report.history
    assert resumed.metadata == whole.metadata
