"""The bounds-checked rANS decoder against compressai's coder (effvision/codecs/rans.py)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from effvision.codecs.rans import (
    SYMBOL_SLACK_BITS,
    CorruptStreamError,
    RansStreamDecoder,
    decode_with_indexes,
    encode_with_indexes,
    encode_with_indexes_python,
    min_stream_bytes,
)


@pytest.fixture(scope="module")
def tables():
    """compressai Gaussian CDF tables (64 scales, as MambaIC) and a random symbol sequence with escapes."""
    from compressai.entropy_models import GaussianConditional

    from effvision.codecs.mambaic.model import get_scale_table

    model = GaussianConditional(None)
    model.update_scale_table(get_scale_table())
    model.update()
    cdfs, sizes, offsets = model._quantized_cdf.tolist(), model._cdf_length.tolist(), model._offset.tolist()
    generator = torch.Generator().manual_seed(0)
    indexes = torch.randint(0, len(cdfs), (20000,), generator=generator)
    values = (torch.randn(20000, generator=generator) * get_scale_table()[indexes] * 2).round().int()
    values[::501] = 5000  # far outside every table: the 4-bit bypass escape
    values[::733] = -70000
    return cdfs, sizes, offsets, indexes.tolist(), values.tolist()


def encode(tables, values=None, indexes=None) -> bytes:
    from compressai.ans import RansEncoder

    cdfs, sizes, offsets, default_indexes, default_values = tables
    values = default_values if values is None else values
    indexes = default_indexes if indexes is None else indexes
    return RansEncoder().encode_with_indexes(values, indexes, cdfs, sizes, offsets)


def test_decodes_what_compressai_encodes_including_escapes(tables):
    from compressai.ans import RansDecoder

    cdfs, sizes, offsets, indexes, values = tables
    stream = encode(tables)
    assert decode_with_indexes(stream, indexes, cdfs, sizes, offsets) == values
    assert RansDecoder().decode_with_indexes(stream, indexes, cdfs, sizes, offsets) == values


def test_decoding_in_several_calls_equals_one_call(tables):
    cdfs, sizes, offsets, indexes, values = tables
    decoder = RansStreamDecoder(encode(tables))
    parts = [decoder.decode(indexes[i : i + 777], cdfs, sizes, offsets) for i in range(0, len(indexes), 777)]
    decoder.finish()
    assert [v for part in parts for v in part] == values


@pytest.mark.parametrize("cut", [4, 8, 100])
def test_a_stream_cut_short_is_an_error_not_a_read_past_its_end(tables, cut):
    cdfs, sizes, offsets, indexes, _ = tables
    with pytest.raises(CorruptStreamError, match="truncated"):
        decode_with_indexes(encode(tables)[:-cut], indexes, cdfs, sizes, offsets)


@pytest.mark.parametrize("extra", [b"\x00\x00\x00\x00", b"\x01\x02\x03\x04" * 3])
def test_words_after_the_last_symbol_are_an_error(tables, extra):
    cdfs, sizes, offsets, indexes, _ = tables
    with pytest.raises(CorruptStreamError, match="after its last symbol"):
        decode_with_indexes(encode(tables) + extra, indexes, cdfs, sizes, offsets)


@pytest.mark.parametrize("stream", [b"", b"\x00" * 4, b"\x00" * 9])
def test_streams_that_are_not_whole_words_are_refused(tables, stream):
    cdfs, sizes, offsets, indexes, _ = tables
    with pytest.raises(CorruptStreamError, match="multiple of 4"):
        decode_with_indexes(stream, indexes[:3], cdfs, sizes, offsets)


def test_fewer_symbols_than_encoded_leave_the_state_unfinished(tables):
    cdfs, sizes, offsets, indexes, _ = tables
    with pytest.raises(CorruptStreamError):
        decode_with_indexes(encode(tables), indexes[:-50], cdfs, sizes, offsets)


def test_bit_flips_give_an_error_or_the_same_values_every_time(tables):
    cdfs, sizes, offsets, indexes, _ = tables
    stream = encode(tables)
    rng = random.Random(0)
    errors = 0
    for _ in range(40):
        damaged = bytearray(stream)
        damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        try:
            first = decode_with_indexes(bytes(damaged), indexes, cdfs, sizes, offsets)
        except CorruptStreamError:
            errors += 1
            continue
        assert decode_with_indexes(bytes(damaged), indexes, cdfs, sizes, offsets) == first
    assert errors >= 30  # the exact-consumption and final-state checks catch nearly every flip


def test_min_stream_bytes_never_exceeds_a_real_stream(tables):
    cdfs, sizes, offsets, _, _ = tables
    rng = random.Random(1)
    for trial in range(20):
        count = rng.choice([2, 10, 1000, 20000])  # compressai's encoder aborts on one-symbol streams
        table = rng.randrange(len(cdfs))
        cdf = cdfs[table][: sizes[table]]
        most_likely = max(range(len(cdf) - 1), key=lambda s: cdf[s + 1] - cdf[s])
        values = [most_likely + offsets[table]] * count  # the likeliest symbol, repeated
        stream = encode(tables, values, [table] * count)
        largest = cdf[most_likely + 1] - cdf[most_likely]
        bits = count * max(0.0, -math.log2(largest / 65536) - SYMBOL_SLACK_BITS)
        assert 8 <= min_stream_bytes(bits) <= len(stream), (trial, count, len(stream), min_stream_bytes(bits))


def test_the_python_encoder_writes_compressais_bytes_including_escapes(tables):
    cdfs, sizes, offsets, indexes, values = tables
    stream = encode_with_indexes_python(values[:3000], indexes[:3000], cdfs, sizes, offsets)
    assert stream == encode(tables, values[:3000], indexes[:3000])
    rng = random.Random(1)
    for _ in range(200):  # short and long pieces, escapes included (every 501st / 733rd value)
        start, length = rng.randrange(len(values) - 800), rng.randint(3, 800)
        piece = slice(start, start + length)
        assert encode_with_indexes_python(values[piece], indexes[piece], cdfs, sizes, offsets) == encode(
            tables, values[piece], indexes[piece])


@pytest.mark.parametrize("count", [0, 1, 2])
def test_streams_of_fewer_than_three_symbols_are_encoded_safely_and_decode(tables, count):
    """compressai's C++ encoder writes these before its buffer (its final state needs two words, its buffer
    has one per symbol): encode_with_indexes codes them in Python. The least likely symbols of the narrowest
    table and escapes are the worst case."""
    cdfs, sizes, offsets, _, _ = tables
    for values in ([-(10**6)] * count, [sizes[0] - 3 + offsets[0]] * count, [5000, -70000][:count]):
        stream = encode_with_indexes(values, [0] * count, cdfs, sizes, offsets)
        assert decode_with_indexes(stream, [0] * count, cdfs, sizes, offsets) == values
