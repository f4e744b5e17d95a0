"""Lossless index-map coding: exact round trips, real byte counts, clear errors on damaged streams."""

import math

import pytest
import torch

from effvision.codecs.vqgan.index_coding import (
    HEADER,
    CorruptStreamError,
    IndexEntropyModel,
    decode_index_map,
    encode_index_map,
    lost_positions,
)


def _maps(k: int, count: int = 8, h: int = 6, w: int = 9, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randint(0, k, (count, h, w), generator=generator)
    maps[:, :, : w // 2] = torch.randint(0, min(3, k), (count, h, 1), generator=generator)  # some redundancy
    return maps


@pytest.mark.parametrize("k", [2, 16, 1000, 16384])
@pytest.mark.parametrize("conditioned", [False, True])
def test_rans_round_trip_is_exact(k, conditioned):
    maps = _maps(k)
    groups = torch.randint(0, 5, (k,)) if conditioned else None
    model = IndexEntropyModel(k, groups).fit(maps[:4])
    for index_map in maps:  # includes maps the model was not fitted on
        stream = encode_index_map(index_map, k, model)
        assert torch.equal(decode_index_map(stream, *index_map.shape, k, model), index_map)


@pytest.mark.parametrize("k", [2, 3, 16, 1000])
def test_fixed_length_round_trip_and_size(k):
    index_map = _maps(k, count=1, h=5, w=7)[0]
    stream = encode_index_map(index_map, k, None)
    assert len(stream) == HEADER.size + math.ceil(35 * max(1, math.ceil(math.log2(k))) / 8)
    assert torch.equal(decode_index_map(stream, 5, 7, k, None), index_map)


def test_rans_payload_is_close_to_the_model_information_content():
    k = 256
    maps = _maps(k, count=20, h=16, w=16)
    model = IndexEntropyModel(k, torch.arange(k) % 4).fit(maps)
    stream = encode_index_map(maps[0], k, model)
    assert abs((len(stream) - HEADER.size) * 8 - model.ideal_bits(maps[0])) < 64


def test_one_by_one_map_round_trips():
    model = IndexEntropyModel(8).fit(torch.tensor([[[3]]]))
    assert torch.equal(decode_index_map(encode_index_map(torch.tensor([[5]]), 8, model), 1, 1, 8, model),
                       torch.tensor([[5]]))


@pytest.mark.parametrize("learned", [False, True])
def test_corrupt_or_truncated_stream_is_a_clear_error(learned):
    k = 64
    maps = _maps(k, count=4, h=8, w=8)
    model = IndexEntropyModel(k, torch.arange(k) % 3).fit(maps) if learned else None
    stream = bytearray(encode_index_map(maps[0], k, model))
    flipped = bytearray(stream)
    flipped[len(flipped) // 2 + 2] ^= 0x5A
    for damaged in (bytes(flipped), bytes(stream[:-3]), bytes(stream[:2]), b""):
        with pytest.raises(CorruptStreamError):
            decode_index_map(damaged, 8, 8, k, model)


def test_unknown_coder_id_and_foreign_codebook_are_errors():
    k = 64
    model = IndexEntropyModel(k).fit(_maps(k))
    stream = encode_index_map(_maps(k)[0], k, model)
    with pytest.raises(CorruptStreamError, match="unknown index coder"):
        decode_index_map(b"\x07" + stream[1:], 6, 9, k, model)
    with pytest.raises(CorruptStreamError):
        decode_index_map(encode_index_map(_maps(k)[0], k, None), 6, 9, 32, None)


def test_fitted_model_codes_skewed_maps_below_fixed_length():
    k = 1024
    generator = torch.Generator().manual_seed(0)
    maps = torch.multinomial(torch.linspace(1, 0.001, k) ** 8, 20 * 256, replacement=True,
                             generator=generator).reshape(20, 16, 16)
    model = IndexEntropyModel(k).fit(maps[:10])
    learned = sum(len(encode_index_map(m, k, model)) for m in maps[10:])
    fixed = sum(len(encode_index_map(m, k, None)) for m in maps[10:])
    assert learned < fixed


def test_lost_positions_cover_the_indices_of_missing_bytes():
    # K=16 -> 4 bits per index, 2 indices per byte after the 3-byte header
    mask = lost_positions(4, 4, 16, [(HEADER.size + 2, HEADER.size + 4)])
    assert mask.flatten().nonzero().flatten().tolist() == [4, 5, 6, 7]
