"""The training nodes' memory options on the ToyBench model (CPU): gradient checkpointing
gives the run without it while autograd keeps a fraction of the activations, 16-bit
autocast trains and keeps smaller ones, and the host's modules come back untouched."""
import contextlib
from dataclasses import replace

import pytest
import torch

from fmn_pack.fmn_core import host
from fmn_pack.fmn_core.concepts import parse_concepts
from fmn_pack.fmn_core.inversion import InversionConfig, invert
from fmn_pack.fmn_core.train import ForgetConfig, forget
from fmn_pack.toybench import loader

CONFIG = ForgetConfig(steps=3, resolution=32, batch_size=2)
CONCEPTS = parse_concepts("star | object\nzebra | style")


@pytest.fixture(scope="module")
def toy():
    return loader.load()


@contextlib.contextmanager
def saved_bytes():
    """Bytes autograd saves for backward outside checkpointed blocks (their own hooks take
    over inside them), counted per saved tensor."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def run(toy, **options):
    with saved_bytes() as total:
        result = forget(toy[0], toy[1], CONCEPTS, replace(CONFIG, **options))
    return result, total[0]


@pytest.fixture(scope="module")
def plain(toy):
    return run(toy)


def cosine(a: dict, b: dict) -> float:
    x = torch.cat([a[k].flatten().float() for k in sorted(a)])
    y = torch.cat([b[k].flatten().float() for k in sorted(b)])
    return float(x @ y / (x.norm() * y.norm()))


def test_gradient_checkpointing_gives_the_same_patch_and_keeps_far_less(toy, plain):
    (reference, kept), (result, kept_checkpointed) = plain, run(toy, gradient_checkpointing=True)
    assert result.losses == pytest.approx(reference.losses, rel=1e-5)
    assert all(torch.allclose(result.lora[k], reference.lora[k], rtol=1e-4, atol=1e-6) for k in reference.lora)
    assert kept_checkpointed < 0.25 * kept
    assert not [b for b in host.unet_blocks(toy[0]) if "forward" in vars(b)], "a block kept its checkpointing forward"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sixteen_bit_autocast_trains_the_same_direction_with_smaller_activations(toy, plain, precision):
    (reference, kept), (result, kept_16) = plain, run(toy, precision=precision)
    assert all(torch.isfinite(v).all() for v in result.lora.values())
    assert result.losses[-1] < result.losses[0]
    assert cosine(result.lora, reference.lora) > 0.9
    assert kept_16 < 0.75 * kept


def test_unknown_precision_is_refused_before_training(toy):
    with pytest.raises(ValueError, match="precision 'fp8'.*fp32, bf16, fp16"):
        forget(toy[0], toy[1], CONCEPTS, replace(CONFIG, precision="fp8"))


def test_inversion_with_gradient_checkpointing_learns_the_same_rows(toy):
    latents = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    config = InversionConfig(steps=3, batch_size=2, learning_rate=1e-2)
    whole = invert(toy[0], toy[1], latents, "thing", config)
    checkpointed = invert(toy[0], toy[1], latents, "thing", replace(config, gradient_checkpointing=True))
    assert checkpointed.losses == pytest.approx(whole.losses, rel=1e-5)
    assert torch.allclose(checkpointed.vectors, whole.vectors, rtol=1e-4, atol=1e-6)
