"""Hardening on the real host (ToyBench's model, CLIP and VAE): nothing a node does bleeds
into the next graph, also when it is interrupted halfway; hostile patch and embedding
files are refused with clear errors, in bounded time and memory, and touch no model;
every name a node writes under stays inside its folder; two trainings on one model are
independent."""
from __future__ import annotations

import contextlib
import json
import re
import resource
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import comfy.model_management as mm
from hostile_files import trap_pickle
from leak_checks import cache_problems, clip_state, host_state, weights
from fmn_pack.fmn_core import host
from fmn_pack.fmn_core.embedding import embedding_filename
from fmn_pack.fmn_core.files import MAX_NAME, inside, safe_filename
from fmn_pack.fmn_core.patch import apply_patch, load_patch, save_patch
from fmn_pack.nodes import NODE_CLASS_MAPPINGS as NODES
from fmn_pack.toybench import loader, world

PROMPT = "a star in the style of neon"
FUZZ_EXAMPLES = 150
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
RSS_GROWTH_LIMIT_KB = 200 * 1024


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """ToyBench with its own (empty) embeddings folder for the CLIP."""
    folder = tmp_path_factory.mktemp("clip_embeddings")
    mp, clip, vae = loader.load(embedding_directory=str(folder))
    return mp, clip, vae, folder


@pytest.fixture(scope="module")
def anchors(toy):
    _, _, vae, _ = toy
    with torch.inference_mode():
        return {"samples": host.vae_encode(vae, torch.from_numpy(world.images_of("star", 4, 100)))}


@pytest.fixture(scope="module")
def trained(toy):
    """(patched MODEL, FORGET_PATCH) of a short Forget Train of star."""
    mp, clip, _, _ = toy
    with torch.inference_mode():
        return NODES["FMN_ForgetTrain"]().train(mp, clip, "star | object", 5, 0.1, 4, 0, resolution=32)["result"]


def sample(model, clip, seed: int = 11) -> torch.Tensor:
    with torch.inference_mode():
        return host.sample_latent(model, host.conditioning(clip, PROMPT), host.conditioning(clip, ""), [seed],
                                  torch.zeros(1, 4, 4, 4), steps=4)


NODE_RUNS = {
    "forget train": lambda mp, clip, vae, latent, patched: NODES["FMN_ForgetTrain"]().train(
        mp, clip, "star | object", 8, 0.1, 4, 0, resolution=32),
    "concept inversion": lambda mp, clip, vae, latent, patched: NODES["FMN_ConceptInversion"]().invert(
        mp, clip, "thing", "leak_probe", 2, 8, 1e-2, 0, latent=latent, overwrite=True),
    "m-score": lambda mp, clip, vae, latent, patched: NODES["FMN_MScore"]().score(
        mp, clip, "star", "thing", 2, 4, 1e-2, 0, patched=patched, latent=latent),
    "attention map viewer": lambda mp, clip, vae, latent, patched: NODES["FMN_AttentionMapViewer"]().view(
        mp, clip, vae, PROMPT, "", 0, 4, 5.0, "euler", "normal", 32, 32, model_after=patched),
}


@contextlib.contextmanager
def unet_calls(model, interrupt_at: int | None = None):
    """Count the UNet forwards of anything run on `model` or its clones (they share the
    module); with `interrupt_at`, press the host's interrupt at that forward, as the
    server's Cancel does."""
    count = 0

    def hook(*_):
        nonlocal count
        count += 1
        if count == interrupt_at:
            mm.interrupt_current_processing(True)

    handle = model.model.diffusion_model.register_forward_pre_hook(hook)
    try:
        yield lambda: count
    finally:
        handle.remove()
        mm.interrupt_current_processing(False)


@pytest.mark.parametrize("node", list(NODE_RUNS))
def test_a_node_leaves_nothing_behind_when_it_finishes_or_is_interrupted_halfway(node, toy, anchors, trained, embeddings_folder):
    mp, clip, vae, _ = toy
    run = NODE_RUNS[node]
    before, context = sample(mp, clip), host.encode(clip, PROMPT)
    state, text_state, original = host_state(mp), clip_state(clip), weights(mp)

    def assert_untouched(when: str) -> None:
        assert host_state(mp) == state, when
        assert clip_state(clip) == text_state, when
        assert cache_problems(mp, original) == [], when
        assert torch.equal(sample(mp, clip), before), f"{when}: the original MODEL samples differently"
        assert torch.equal(host.encode(clip, PROMPT), context), f"{when}: the CLIP encodes differently"

    with unet_calls(mp) as calls, torch.inference_mode():
        run(mp, clip, vae, anchors, trained[0])
    total = calls()
    assert_untouched(f"after {node}")
    written = {p.name: p.read_bytes() for p in embeddings_folder.iterdir()}
    with unet_calls(mp, interrupt_at=total // 2 + 1) as calls:
        with pytest.raises(mm.InterruptProcessingException), torch.inference_mode():
            run(mp, clip, vae, anchors, trained[0])
    assert total // 2 + 1 <= calls() < total, f"interrupted at forward {calls()} of {total}"
    assert_untouched(f"after {node} was interrupted")
    assert {p.name: p.read_bytes() for p in embeddings_folder.iterdir()} == written, "an interrupted run changed a file"


def test_two_trainings_on_one_model_are_independent(toy):
    """As two Forget Train nodes on one loader in one graph: the second patch equals the
    one trained on a freshly loaded model, and the first equals a repeat of itself."""
    mp, clip, _, _ = toy
    train = NODES["FMN_ForgetTrain"]()
    with torch.inference_mode():
        first = train.train(mp, clip, "star | object", 6, 0.1, 4, 0, resolution=32)["result"][1]
        second = train.train(mp, clip, "Captain Zorb | identity", 6, 0.1, 4, 3, resolution=32)["result"][1]
        fresh_mp, fresh_clip, _ = loader.load()
        alone = train.train(fresh_mp, fresh_clip, "Captain Zorb | identity", 6, 0.1, 4, 3, resolution=32)["result"][1]
        again = train.train(mp, clip, "star | object", 6, 0.1, 4, 0, resolution=32)["result"][1]
    for one, other in ((second, alone), (first, again)):
        assert one.lora.keys() == other.lora.keys()
        assert all(torch.equal(one.lora[k], other.lora[k]) for k in one.lora)
    assert not torch.equal(first.lora[next(iter(first.lora))], second.lora[next(iter(first.lora))])


# --- hostile files -------------------------------------------------------------------

def split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def join(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=8),
                 st.lists(st.integers(-2**64, 2**64), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
FIELDS = st.sampled_from(["dtype", "shape", "data_offsets"])
DTYPES = st.sampled_from(["I64", "I32", "F64", "BOOL", "U8", "F8_E4M3", "f32", ""])


@st.composite
def hostile(draw, valid: bytes) -> bytes:
    """A valid file with one thing made wrong."""
    header, payload = split(valid)
    keys = sorted(k for k in header if k != "__metadata__")
    key = draw(st.sampled_from(keys))
    kind = draw(st.sampled_from(["field", "dtype", "huge shape", "metadata", "list field", "drop key", "rename key",
                                 "non-finite", "header length", "truncate", "garbage", "not an object", "alpha"]))
    if kind == "field":
        header[key][draw(FIELDS)] = draw(JUNK)
    elif kind == "dtype":
        header[key]["dtype"] = draw(DTYPES)
    elif kind == "huge shape":
        header[key]["shape"] = [draw(st.integers(2**31, 2**62)), draw(st.integers(1, 2**40))]
    elif kind == "metadata":
        header["__metadata__"] = draw(st.one_of(JUNK, st.dictionaries(st.text(max_size=6), JUNK, max_size=3)))
    elif kind == "list field":
        header.setdefault("__metadata__", {})[draw(st.sampled_from(["fmn.concepts", "fmn.anchors"]))] = draw(st.text(max_size=12))
    elif kind == "drop key":
        del header[key]
    elif kind == "rename key":
        header[draw(st.text(min_size=1, max_size=20))] = header.pop(key)
    elif kind == "non-finite":
        start = header[key]["data_offsets"][0]
        value = struct.pack("<e", draw(st.sampled_from([float("nan"), float("inf"), float("-inf")])))
        payload = payload[:start] + value + payload[start + 2:]
    elif kind == "header length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + join(header, payload)[8:]
    elif kind == "truncate":
        return join(header, payload)[:draw(st.integers(0, len(valid) - 1))]
    elif kind == "garbage":
        return draw(st.binary(max_size=64)) + join(header, payload)[draw(st.integers(0, 16)):]
    elif kind == "not an object":
        return join(draw(st.lists(st.integers(), max_size=3)), payload)
    elif kind == "alpha":
        alpha = next((k for k in keys if k.endswith(".alpha")), key)
        header[alpha]["shape"] = [2]
        header[alpha]["data_offsets"] = [header[alpha]["data_offsets"][0], header[alpha]["data_offsets"][0] + 4]
    return join(header, payload)


@pytest.fixture(scope="module")
def valid_patch_bytes(trained, tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("patch") / "valid.safetensors"
    return save_patch(trained[1], path).read_bytes()


def fuzz(valid: bytes, target: Path, use: Callable[[], None], names: str) -> None:
    """Write hostile variants of `valid` to `target` and `use` each: it must succeed or
    raise a ValueError whose message matches `names`; most must be refused, and memory
    must stay bounded."""
    outcomes = {"refused": 0, "accepted": 0}
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @FUZZ
    @given(data=st.data())
    def check(data):
        target.write_bytes(data.draw(hostile(valid)))
        try:
            use()
            outcomes["accepted"] += 1
        except ValueError as e:
            assert re.search(names, str(e)), e
            outcomes["refused"] += 1

    check()
    assert outcomes["refused"] >= FUZZ_EXAMPLES // 2, outcomes
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss < RSS_GROWTH_LIMIT_KB


def test_hostile_patch_files_are_refused_and_touch_no_model(toy, valid_patch_bytes, tmp_path):
    mp = toy[0]
    state, original = host_state(mp), weights(mp)
    path = tmp_path / "hostile.safetensors"

    def load_and_apply() -> None:
        with torch.inference_mode():
            apply_patch(mp, load_patch(path), 1.0)

    fuzz(valid_patch_bytes, path, load_and_apply, r"hostile\.safetensors|forget patch does not fit")
    assert host_state(mp) == state and cache_problems(mp, original) == []


def test_hostile_embedding_files_are_refused_with_the_file_named(toy, tmp_path):
    """Every node's text goes through `host.check_embeddings`: a prompt naming a hostile
    embedding stops with an error before the host's tokenizer could skip or load it."""
    from safetensors.torch import save_file
    _, clip, _, folder = toy
    save_file({"clip_l": torch.randn(2, 768)}, str(tmp_path / "valid.safetensors"))

    def encode() -> None:
        assert torch.isfinite(host.encode(clip, "a portrait of embedding:hostile")).all()

    fuzz((tmp_path / "valid.safetensors").read_bytes(), folder / "hostile.safetensors", encode, r"hostile")


def write_pickle(stem: Path, marker: Path) -> None:
    stem.with_suffix(".pt").write_bytes(trap_pickle(marker))


def write_narrow(stem: Path, marker: Path) -> None:
    from safetensors.torch import save_file
    save_file({"clip_l": torch.ones(2, 5)}, str(stem.with_suffix(".safetensors")))


@pytest.mark.parametrize("problem, make, message", [
    ("pickle", write_pickle, "never loaded"),
    ("narrow", write_narrow, "made for another model family"),
    ("missing", lambda stem, marker: None, "was not found"),
])
def test_every_node_refuses_a_bad_embedding_before_running(problem, make, message, toy, anchors, tmp_path):
    mp, clip, vae, folder = toy
    marker = tmp_path / "unpickled"
    make(folder / f"bad_{problem}", marker)
    word = f"embedding:bad_{problem}"
    runs = [
        lambda: NODES["FMN_ForgetTrain"]().train(mp, clip, f"{word} | object", 2, 0.1, 4, 0, resolution=32),
        lambda: NODES["FMN_AttentionMapViewer"]().view(mp, clip, vae, f"a {word}", "", 0, 2, 5.0, "euler", "normal", 32, 32),
        lambda: NODES["FMN_MScore"]().score(mp, clip, word, "thing", 2, 2, 1e-2, 0, latent=anchors),
    ]
    for run in runs:
        with pytest.raises(ValueError, match=message), torch.inference_mode():
            run()
    assert not marker.exists()


# --- file names ----------------------------------------------------------------------

@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(name=st.text(max_size=300))
def test_any_name_gives_a_file_inside_its_folder_or_a_clear_error(name, tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / "names"
    for make in (lambda n: safe_filename(n, ".safetensors"), embedding_filename):
        try:
            filename = make(name)
        except ValueError as e:
            assert "no usable characters" in str(e)
            continue
        path = inside(folder, filename)
        assert path.parent == folder.resolve() and path.name == filename
        assert filename.endswith(".safetensors") and len(filename) <= MAX_NAME + len(".safetensors")
        assert filename.split(".")[0].lower() not in {"con", "nul", "prn", "aux", "com1", "lpt1"}


@pytest.mark.parametrize("name", ["../../escape", "/etc/passwd", "..\\..\\windows", "CON", "nul.txt", "x" * 1000,
                                  "a/b/c", "~/.bashrc", "name\x00with nul", "  spaced name  "])
def test_save_nodes_write_inside_their_folders(name, trained, embeddings_folder, tmp_path_factory, anchors, toy):
    import folder_paths
    mp, clip, _, _ = toy
    patches = tmp_path_factory.mktemp("patches")
    saved = folder_paths.folder_names_and_paths["forget_patches"]
    folder_paths.folder_names_and_paths["forget_patches"] = ([str(patches)], saved[1])
    try:
        NODES["FMN_SaveForgetPatch"]().save(trained[1], name, False)
        with torch.inference_mode():
            out = NODES["FMN_ConceptInversion"]().invert(mp, clip, "thing", name, 1, 1, 1e-2, 0, latent=anchors)
    finally:
        folder_paths.folder_names_and_paths["forget_patches"] = saved
    assert [p.parent for p in patches.iterdir()] == [patches] and [p.parent for p in embeddings_folder.iterdir()] == [embeddings_folder]
    word = out["result"][1]
    assert word == "embedding:" + next(embeddings_folder.iterdir()).stem and " " not in word
    assert all(not p.name.endswith(".tmp") for p in [*patches.iterdir(), *embeddings_folder.iterdir()])
