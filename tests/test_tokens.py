"""Token locator on the real host tokenizers (SD1 pads with the end token, SD2 with 0)."""
import pytest
import torch
from safetensors.torch import save_file

import host_models as hm
from fmn_pack.fmn_core import host
from fmn_pack.fmn_core.tokens import SpecialTokens, anchor_alignment, concept_positions, content_tokens


def locate(clip, prompt, concept, include_end=False):
    special = SpecialTokens(**host.special_tokens(clip))
    needle = content_tokens(host.tokenize(clip, concept), special)
    return concept_positions(host.tokenize(clip, prompt), needle, special, include_end)


@pytest.fixture(scope="module")
def clip1():
    return hm.sd1_clip()


@pytest.fixture(scope="module")
def clip2():
    return hm.sd2_clip()


def test_multi_token_phrase_and_repeats(clip1):
    # "a photo of van gogh and van gogh": start=0, a=1, photo=2, of=3, van=4, gogh=5, and=6, van=7, gogh=8
    assert locate(clip1, "a photo of van gogh and van gogh", "Van Gogh") == [4, 5, 7, 8]


def test_weight_syntax_is_found(clip1):
    assert locate(clip1, "a photo of a (red fox:1.3) in snow", "red fox") == [5, 6]


def test_sd1_end_token_marks_exactly_one_position(clip1):
    tokens = host.tokenize(clip1, "a photo of van gogh")[0]
    assert tokens.count(49407) > 60  # SD1 pads with the end token
    assert locate(clip1, "a photo of van gogh", "van gogh", include_end=True) == [4, 5, 6]


def test_sd2_end_token_with_zero_padding(clip2):
    tokens = host.tokenize(clip2, "a photo of van gogh")[0]
    assert tokens[6] == 49407 and tokens[7] == 0
    assert locate(clip2, "a photo of van gogh", "van gogh", include_end=True) == [4, 5, 6]


def test_prompt_longer_than_one_chunk(clip1):
    filler = " ".join(["tree"] * 80)
    positions = locate(clip1, f"{filler} van gogh", "van gogh")
    chunks = host.tokenize(clip1, f"{filler} van gogh")
    assert len(chunks) == 2
    assert all(p >= 77 for p in positions) and len(positions) == 2
    flat = [t for chunk in chunks for t in chunk]
    assert [flat[p] for p in positions] == content_tokens(host.tokenize(clip1, "van gogh"),
                                                          SpecialTokens(**host.special_tokens(clip1)))


def test_embedding_concept(tmp_path):
    save_file({"emb": torch.randn(3, 768)}, str(tmp_path / "my_cat.safetensors"))
    clip = hm.sd1_clip(embedding_directory=str(tmp_path))
    assert locate(clip, "a photo of embedding:my_cat on a sofa", "embedding:my_cat") == [4, 5, 6]


def test_concept_that_tokenizes_to_nothing(clip1):
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        locate(clip1, "a photo of", "   ")


@pytest.mark.parametrize("which", ["clip1", "clip2"])
def test_anchor_alignment_pairs_the_tokens_after_the_concept(which, request):
    """"a van gogh in the rain" vs its anchor "a in the rain": every later token (and the
    padding) pairs with its twin two places earlier; the tokens before the concept pair
    with nothing, because they cannot carry it."""
    clip = request.getfixturevalue(which)
    chunks, anchor = host.tokenize(clip, "a van gogh in the rain"), host.tokenize(clip, "a in the rain")
    positions = locate(clip, "a van gogh in the rain", "van gogh")
    assert positions == [2, 3]
    pairs = anchor_alignment(chunks, anchor, positions, 0)
    assert pairs[:4] == [(4, 2), (5, 3), (6, 4), (7, 5)]  # in, the, rain, end
    assert pairs[-1] == (76, 74) and len(pairs) == 73
    assert all(chunks[0][i] == anchor[0][j] for i, j in pairs)
    replaced = host.tokenize(clip, "a painter in the rain")  # one token in the concept's place
    assert anchor_alignment(chunks, replaced, positions, 1)[:2] == [(4, 3), (5, 4)]


def test_anchor_alignment_stops_where_tokens_disagree(clip1):
    chunks = host.tokenize(clip1, "a van gogh in the rain")
    other = host.tokenize(clip1, "a in the snow")
    assert anchor_alignment(chunks, other, [2, 3], 0) == [(4, 2), (5, 3)]
    assert anchor_alignment(chunks, other, [], 0) == []
