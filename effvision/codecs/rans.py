"""A bounds-checked decoder for compressai's rANS bitstreams, and the coder that uses it.

compressai's C++ ``RansDecoder`` trusts its input: it reads 32-bit words past the end of a stream that is
too short for the symbols it is asked for (a crafted file then crashes the process or decodes to
different pixels on every run). :class:`RansStreamDecoder` decodes exactly the same format (ryg's
``rans64``: 64-bit state, 32-bit words, 16-bit probabilities, compressai's 4-bit bypass escape for values
outside a CDF's range) in Python, with every read checked, and proves at the end that the stream was
consumed exactly: every word read and the state back at the encoder's initial value. A stream that
passes is, symbol for symbol, what compressai's encoder writes for the decoded values; anything else
raises :class:`CorruptStreamError`.

:class:`CheckedRansCoder` swaps in this decoder and :func:`encode_with_indexes` as encoder;
:func:`use_checked_decoder` installs it on every compressai entropy model of a module.

compressai's C++ encoder has a bug of its own: it sizes its output buffer at one 32-bit word per coded entry,
and its final state alone takes two. A stream of one or two symbols (three or more always fit: each symbol
carries at most 16 bits, so n symbols emit at most n/2 words before the flush) is written *before* the buffer,
corrupting the heap ("double free or corruption"), e.g. a VQGAN tile of 16 x 32 pixels.
:func:`encode_with_indexes` therefore encodes such short streams here, in Python, exactly as the C++ encoder
writes them when it has room (the same bytes), and leaves every longer stream to the C++ encoder.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

import numpy as np

from effvision.errors import UserError

PRECISION = 16
BYPASS_BITS = 4
MAX_BYPASS_VALUE = (1 << BYPASS_BITS) - 1
#: rans64's lower bound of the normalised state, and the state every stream starts (encoder) / ends
#: (decoder) with.
STATE_LOW = 1 << 31
#: 32 bits of raw value at 4 bits per bypass symbol: more is never written by the encoder.
MAX_BYPASS_SYMBOLS = 8
#: every stream ends with the encoder's flushed 64-bit state.
MIN_STREAM_BYTES = 8
_MASK = (1 << PRECISION) - 1


class CorruptStreamError(UserError, ValueError):
    """An entropy-coded stream that is truncated, too long, or not what the encoder writes."""


class RansStreamDecoder:
    """Decode one rANS stream, possibly in several calls (e.g. row by row), then :meth:`finish`.

    Args:
        stream: the encoded bytes: a whole number of little-endian 32-bit words, at least two.
    """

    def __init__(self, stream: bytes) -> None:
        if len(stream) < MIN_STREAM_BYTES or len(stream) % 4:
            raise CorruptStreamError(
                f"rANS stream of {len(stream)} bytes (needs a multiple of 4, at least {MIN_STREAM_BYTES})"
            )
        words = np.frombuffer(bytes(stream), dtype="<u4").tolist()  # little-endian 32-bit words, as written
        self._words = words
        self._state = words[0] | (words[1] << 32)
        self._position = 2

    def _refill(self, state: int) -> int:
        if self._position >= len(self._words):
            raise CorruptStreamError("rANS stream is truncated (the decoder needs more words than it holds)")
        state = (state << 32) | self._words[self._position]
        self._position += 1
        return state

    def _bits(self, state: int) -> tuple[int, int]:
        value = state & MAX_BYPASS_VALUE
        state >>= BYPASS_BITS
        if state < STATE_LOW:
            state = self._refill(state)
        return value, state

    def decode(
        self,
        indexes: Sequence[int],
        cdfs: Sequence[Sequence[int]],
        cdf_sizes: Sequence[int],
        offsets: Sequence[int],
    ) -> list[int]:
        """Decode one symbol per entry of ``indexes`` (each selects a CDF), as compressai's
        ``decode_stream`` / ``decode_with_indexes``. The CDFs come from the model, never from the file."""
        words = self._words
        count = len(words)
        position = self._position
        state = self._state
        output = []
        append = output.append
        for index in indexes:
            cdf = cdfs[index]
            size = cdf_sizes[index]
            cumulative = state & _MASK
            symbol = bisect_right(cdf, cumulative, 0, size) - 1
            start = cdf[symbol]
            state = (cdf[symbol + 1] - start) * (state >> PRECISION) + cumulative - start
            if state < STATE_LOW:
                if position >= count:
                    raise CorruptStreamError("rANS stream is truncated (the decoder needs more words than it holds)")
                state = (state << 32) | words[position]
                position += 1
            if symbol == size - 2:  # the escape symbol: the value follows in 4-bit bypass symbols
                self._position, self._state = position, state
                symbol = self._bypass_value(symbol)
                position, state = self._position, self._state
            append(symbol + offsets[index])
        self._position, self._state = position, state
        return output

    def _bypass_value(self, max_value: int) -> int:
        value, state = self._bits(self._state)
        count = value
        while value == MAX_BYPASS_VALUE:
            value, state = self._bits(state)
            count += value
            if count > MAX_BYPASS_SYMBOLS:
                break
        if count > MAX_BYPASS_SYMBOLS:
            raise CorruptStreamError(f"rANS escape announces {count} 4-bit groups (at most {MAX_BYPASS_SYMBOLS})")
        raw = 0
        for group in range(count):
            value, state = self._bits(state)
            raw |= value << (group * BYPASS_BITS)
        self._state = state
        if raw >= 1 << 31:  # compressai keeps the raw value in an int32
            raw -= 1 << 32
        half = raw >> 1
        return -half - 1 if raw & 1 else half + max_value

    def finish(self) -> None:
        """Check that the stream was consumed exactly: no word left over, state back at its start."""
        if self._position != len(self._words):
            left = 4 * (len(self._words) - self._position)
            raise CorruptStreamError(f"rANS stream has {left} bytes after its last symbol")
        if self._state != STATE_LOW:
            raise CorruptStreamError("rANS stream does not decode consistently (corrupt data)")


def decode_with_indexes(
    stream: bytes,
    indexes: Sequence[int],
    cdfs: Sequence[Sequence[int]],
    cdf_sizes: Sequence[int],
    offsets: Sequence[int],
) -> list[int]:
    """Checked drop-in for compressai's ``RansDecoder.decode_with_indexes``: the whole stream, exactly."""
    decoder = RansStreamDecoder(stream)
    values = decoder.decode(indexes, cdfs, cdf_sizes, offsets)
    decoder.finish()
    return values


#: streams of fewer symbols are encoded in Python (see the module docstring)
MIN_CXX_SYMBOLS = 3


def _escape_entries(value: int, max_value: int) -> tuple[int, list[int]]:
    """compressai's coding of one value: (the CDF symbol, the 4-bit bypass entries that follow it)."""
    if value < 0:
        raw = -2 * value - 1
    elif value >= max_value:
        raw = 2 * (value - max_value)
    else:
        return value, []
    if raw >= 1 << 31:
        raise ValueError(f"value {value} is too far outside its CDF for compressai's 32-bit escape code")
    value = max_value
    count = 0
    while raw >> (count * BYPASS_BITS):
        count += 1
    entries = [MAX_BYPASS_VALUE] * (count // MAX_BYPASS_VALUE) + [count % MAX_BYPASS_VALUE]
    entries += [(raw >> (group * BYPASS_BITS)) & MAX_BYPASS_VALUE for group in range(count)]
    return value, entries


def encode_with_indexes_python(
    symbols: Sequence[int],
    indexes: Sequence[int],
    cdfs: Sequence[Sequence[int]],
    cdf_sizes: Sequence[int],
    offsets: Sequence[int],
) -> bytes:
    """compressai's ``RansEncoder.encode_with_indexes`` in Python (ryg's rans64; the same bytes), for any
    number of symbols. Slow: :func:`encode_with_indexes` uses it for short streams only."""
    entries: list[tuple[int, int, bool]] = []  # (start, frequency or value, bypass)
    for symbol, index in zip(symbols, indexes, strict=True):
        cdf = cdfs[index]
        value, bypass = _escape_entries(int(symbol) - offsets[index], cdf_sizes[index] - 2)
        entries.append((cdf[value], cdf[value + 1] - cdf[value], False))
        entries.extend((bits, 0, True) for bits in bypass)
    words: list[int] = []
    state = STATE_LOW
    for start, frequency, bypass in reversed(entries):
        if bypass:  # rans64's PutBits: the renormalisation of a symbol of probability 2**-4
            frequency = 1 << (PRECISION - BYPASS_BITS)
        if state >= ((STATE_LOW >> PRECISION) << 32) * frequency:
            words.append(state & 0xFFFFFFFF)
            state >>= 32
        if bypass:
            state = (state << BYPASS_BITS) | start
        else:
            state = ((state // frequency) << PRECISION) + (state % frequency) + start
    words += [state >> 32, state & 0xFFFFFFFF]  # the flush, read first by the decoder
    return np.array(words[::-1], dtype="<u4").tobytes()


def encode_with_indexes(
    symbols: Sequence[int],
    indexes: Sequence[int],
    cdfs: Sequence[Sequence[int]],
    cdf_sizes: Sequence[int],
    offsets: Sequence[int],
) -> bytes:
    """Safe drop-in for compressai's ``RansEncoder().encode_with_indexes``: the C++ encoder for streams of at
    least :data:`MIN_CXX_SYMBOLS` symbols, :func:`encode_with_indexes_python` for shorter ones."""
    if len(symbols) < MIN_CXX_SYMBOLS:
        return encode_with_indexes_python(symbols, indexes, cdfs, cdf_sizes, offsets)
    from compressai.ans import RansEncoder

    return RansEncoder().encode_with_indexes(list(symbols), list(indexes), cdfs, list(cdf_sizes), list(offsets))

class CheckedRansCoder:
    """compressai's rANS format with :func:`encode_with_indexes` as encoder (compressai's C++ encoder where it
    is safe) and :func:`decode_with_indexes` as decoder (same bitstreams)."""

    name = "ans"

    @staticmethod
    def encode_with_indexes(symbols, indexes, cdfs, cdf_sizes, offsets) -> bytes:
        return encode_with_indexes(symbols, indexes, cdfs, cdf_sizes, offsets)

    @staticmethod
    def decode_with_indexes(stream, indexes, cdfs, cdf_sizes, offsets) -> list[int]:
        return decode_with_indexes(bytes(stream), indexes, cdfs, cdf_sizes, offsets)


def use_checked_decoder(module) -> None:
    """Make every compressai entropy model in ``module`` decode with the checked decoder."""
    from compressai.entropy_models import EntropyModel

    coder = CheckedRansCoder()
    for child in module.modules():
        if isinstance(child, EntropyModel):
            child.entropy_coder = coder


#: the largest |offset| a CDF table may shift its symbols by (real tables: a few hundred)
MAX_CDF_OFFSET = 1 << 20


def cdf_table_problem(cdfs, lengths, offsets, rows: int) -> str | None:
    """What is wrong with compressai CDF tables as an entropy model holds them (``_quantized_cdf`` (R, W),
    ``_cdf_length`` (R,), ``_offset`` (R,) int tensors) for a model that indexes ``rows`` of them, or None.

    compressai's C++ encoder trusts these tables: a length past its row reads outside it, a symbol of zero
    width divides by zero. So: R == ``rows``; every length in [3, W]; every row starts at 0, rises strictly up
    to its length - 1, where it holds 2**16; offsets within +-:data:`MAX_CDF_OFFSET`."""
    import torch

    if cdfs.dim() != 2 or lengths.shape != (cdfs.shape[0],) or offsets.shape != lengths.shape:
        return f"tables of shapes {tuple(cdfs.shape)}, {tuple(lengths.shape)}, {tuple(offsets.shape)}"
    if any(t.is_floating_point() for t in (cdfs, lengths, offsets)):
        return "tables that are not integers"
    if cdfs.shape[0] != rows:
        return f"{cdfs.shape[0]} CDF rows where the model indexes {rows}"
    width = cdfs.shape[1]
    if rows == 0:
        return None
    lengths, cdfs, offsets = lengths.long(), cdfs.long(), offsets.long()
    if int(lengths.min()) < 3 or int(lengths.max()) > width:
        return f"CDF lengths outside [3, {width}]"
    if int(offsets.abs().max()) > MAX_CDF_OFFSET:
        return f"CDF offsets beyond +-{MAX_CDF_OFFSET}"
    rising = cdfs[:, 1:] > cdfs[:, :-1]
    inside = torch.arange(width - 1)[None, :] < (lengths - 1)[:, None]
    ends = cdfs.gather(1, (lengths - 1)[:, None]).squeeze(1)
    if bool((cdfs[:, 0] != 0).any()) or not bool((rising | ~inside).all()) or bool((ends != 1 << PRECISION).any()):
        return f"CDF rows that do not rise strictly from 0 to {1 << PRECISION}"
    return None

def min_stream_bytes(symbol_bits: float) -> int:
    """Fewest bytes a stream can have whose symbols carry at least ``symbol_bits`` bits of information.

    The encoder starts from a 31-bit state and flushes its final state (< 2**64) as 8 bytes; each symbol of
    probability p multiplies the state by at least (1 - 2**-15) / p, so the words it emits carry at least
    ``symbol_bits - 64 + 31`` bits once the per-symbol loss (callers subtract it) is accounted for.
    """
    emitted_bits = max(0.0, symbol_bits - 33.0)
    return MIN_STREAM_BYTES + 4 * math.floor(emitted_bits / 32)


#: information lost per symbol by rANS's integer state (bits), an upper bound: log2(1 / (1 - 2**-15)).
SYMBOL_SLACK_BITS = -math.log2(1 - 2.0**-15)
