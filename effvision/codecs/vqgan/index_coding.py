"""Lossless coding of a VQGAN index map (h, w) of a K-entry codebook.

Mao et al. (DCC 2024) send indices at a fixed log2(K) bits each (a uniform PMF). Here the indices are
entropy coded with compressai's rANS coder under an empirical model fitted on reference index maps:
``p(index | context)`` where the context is the K-means group of the index *above* (the previous row
is decoded first, so the decoder knows it). Counts are smoothed towards the marginal histogram
(a Dirichlet prior), so unseen (context, index) pairs stay codable.

Stream layout (``bytes``): 1 byte coder id (0 fixed-length, 1 rANS), 2 bytes CRC-16 of the index map
(low 16 bits of zlib.crc32 over the little-endian uint16/uint32 indices), then the payload. A damaged
stream raises ``ValueError`` instead of silently decoding garbage.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import torch
from torch import Tensor

from effvision.codecs.rans import CorruptStreamError, RansStreamDecoder, encode_with_indexes

__all__ = ["CorruptStreamError", "IndexEntropyModel", "decode_index_map", "encode_index_map"]

FIXED_LENGTH = 0
RANS = 1
HEADER = struct.Struct("<BH")
CDF_PRECISION = 16


def index_checksum(indices: np.ndarray) -> int:
    dtype = "<u2" if indices.max(initial=0) < 2**16 else "<u4"
    return zlib.crc32(np.ascontiguousarray(indices, dtype=dtype).tobytes()) & 0xFFFF


def bits_per_index(k: int) -> int:
    """Bits of the fixed-length code of a K-entry codebook: ceil(log2 K), at least 1."""
    return max(1, math.ceil(math.log2(k)))


def pack_fixed_length(indices: np.ndarray, k: int) -> bytes:
    """Pack indices (any shape, values < K) MSB-first at ceil(log2 K) bits each."""
    bits = bits_per_index(k)
    flat = indices.reshape(-1).astype(np.uint32)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    return np.packbits(((flat[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)).tobytes()


def unpack_fixed_length(payload: bytes, count: int, k: int, damaged: bool = False) -> np.ndarray:
    """Inverse of :func:`pack_fixed_length`. ``damaged``: out-of-range values (in lost regions) become 0."""
    bits = bits_per_index(k)
    needed = math.ceil(count * bits / 8)
    if len(payload) != needed:
        raise CorruptStreamError(f"fixed-length index stream has {len(payload)} bytes, expected {needed}")
    all_bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))
    if all_bits[count * bits :].any():
        raise CorruptStreamError("fixed-length index stream has non-zero padding bits")
    unpacked = all_bits[: count * bits].reshape(count, bits)
    values = (unpacked.astype(np.int64) << np.arange(bits - 1, -1, -1)).sum(1)
    if (values >= k).any():
        if not damaged:
            raise CorruptStreamError(f"fixed-length index stream holds an index >= codebook size {k}")
        values[values >= k] = 0
    return values


class IndexEntropyModel:
    """Empirical, top-neighbour-conditioned probability model of the indices of one codebook.

    Args:
        k: codebook size.
        groups: (K,) context group of every index (e.g. K-means of the codebook into G groups), or None
            for an unconditional histogram. Context of a position = group of the index above it; the first
            row uses an extra "no neighbour" context.
        counts: (contexts, K) float counts; fit them with :meth:`fit`.
    """

    def __init__(self, k: int, groups: Tensor | None = None, counts: Tensor | None = None, prior: float = 8.0):
        self.k = k
        self.groups = None if groups is None else groups.long().cpu()  # the tables live on the CPU (rANS)
        self.num_contexts = 1 if groups is None else int(self.groups.max()) + 2
        self.prior = prior
        self.counts = torch.zeros(self.num_contexts, k, dtype=torch.float64) if counts is None else counts.double()
        self._build_cdfs()

    def contexts(self, indices: Tensor) -> Tensor:
        """(..., h, w) indices -> (..., h, w) context ids."""
        if self.groups is None:
            return torch.zeros_like(indices)
        above = self.groups[indices[..., :-1, :].cpu()].to(indices.device) + 1  # CUDA indices into a CPU table
        first_row = torch.zeros_like(indices[..., :1, :])
        return torch.cat([first_row, above], dim=-2)

    def fit(self, index_maps: list[Tensor] | Tensor) -> IndexEntropyModel:
        """Accumulate counts from index maps, each (h, w) (a (N, h, w) tensor also works)."""
        counts = torch.zeros(self.num_contexts, self.k, dtype=torch.float64)
        for index_map in index_maps:
            index_map = torch.as_tensor(index_map).long()
            flat = (self.contexts(index_map) * self.k + index_map).reshape(-1)
            counts += torch.bincount(flat, minlength=self.num_contexts * self.k).double().reshape(counts.shape)
        self.counts = counts
        self._build_cdfs()
        return self

    def probabilities(self) -> Tensor:
        """(contexts, K) smoothed probabilities: add-half marginal, Dirichlet(prior * marginal) per context."""
        marginal = self.counts.sum(0) + 0.5
        marginal = marginal / marginal.sum()
        per_context = self.counts + self.prior * marginal
        return per_context / per_context.sum(1, keepdim=True)

    def likelihoods(self, indices: Tensor) -> Tensor:
        """Model probability of every index in (..., h, w)."""
        table = self.probabilities().to(torch.float32)
        on_cpu = indices.cpu()
        return table[self.contexts(on_cpu), on_cpu].to(indices.device)

    def _build_cdfs(self) -> None:
        from compressai._CXX import pmf_to_quantized_cdf

        # one extra symbol for compressai's escape (bypass) code, never used by in-range indices
        probabilities = self.probabilities()
        escape = torch.full((self.num_contexts, 1), 1.0 / (1 << CDF_PRECISION), dtype=torch.float64)
        pmfs = torch.cat([probabilities, escape], 1)
        pmfs = (pmfs / pmfs.sum(1, keepdim=True)).tolist()
        self.cdfs = [pmf_to_quantized_cdf(pmf, CDF_PRECISION) for pmf in pmfs]

    def ideal_bits(self, indices: Tensor) -> float:
        """-sum log2 p of an index map under the model (the rANS payload is within a few bytes of it)."""
        return float(-self.likelihoods(indices).double().log2().sum())

    def encode(self, indices: Tensor) -> bytes:
        contexts = self.contexts(indices).reshape(-1).tolist()
        symbols = indices.reshape(-1).tolist()
        if len(symbols) == 1:  # part of the format: a one-symbol map carries a padding symbol 0 (decoded, unused),
            symbols, contexts = symbols + [0], contexts + [0]  # once a workaround for compressai's encoder
        # rans.encode_with_indexes, not compressai's RansEncoder, which corrupts the heap on streams this short
        return encode_with_indexes(
            symbols, contexts, self.cdfs, [self.k + 2] * self.num_contexts, [0] * self.num_contexts
        )

    def decode(self, payload: bytes, h: int, w: int, damaged: bool = False) -> Tensor:
        """Decode an (h, w) map row by row: a row's contexts come from the row above. ``damaged``:
        out-of-range symbols (from lost regions) become 0 instead of raising."""
        # Bounds-checked: a truncated stream raises instead of reading past its end, and the stream must
        # be consumed exactly (no trailing bytes) even in a damaged band.
        decoder = RansStreamDecoder(payload)
        rows: list[Tensor] = []
        previous: Tensor | None = None
        for _ in range(h):
            if previous is None or self.groups is None:
                row_contexts = [0] * w
            else:
                row_contexts = (self.groups[previous] + 1).tolist()
            used = sorted(set(row_contexts))
            local = {context: slot for slot, context in enumerate(used)}
            values = decoder.decode(
                [local[c] for c in row_contexts],
                [self.cdfs[c] for c in used],
                [self.k + 2] * len(used),
                [0] * len(used),
            )
            row = torch.tensor(values, dtype=torch.long)
            outside = (row < 0) | (row >= self.k)
            if outside.any():
                if not damaged:
                    raise CorruptStreamError("index stream decodes to an index outside the codebook")
                row = row.masked_fill(outside, 0)
            rows.append(row)
            previous = row
        if h * w == 1:  # the encoder's padding symbol (see encode)
            decoder.decode([0], [self.cdfs[0]], [self.k + 2], [0])
        decoder.finish()
        return torch.stack(rows)


def encode_index_map(indices: Tensor, k: int, model: IndexEntropyModel | None) -> bytes:
    """(h, w) indices -> stream; ``model=None`` selects the fixed-length code."""
    array = indices.cpu().numpy()
    header = HEADER.pack(FIXED_LENGTH if model is None else RANS, index_checksum(array))
    if model is None:
        return header + pack_fixed_length(array, k)
    if model.k != k:
        raise ValueError(f"index model is for K={model.k}, codebook has K={k}")
    return header + model.encode(indices.cpu().long())


def decode_index_map(
    stream: bytes, h: int, w: int, k: int, model: IndexEntropyModel | None, damaged: bool = False
) -> Tensor:
    """Inverse of :func:`encode_index_map`; raises :class:`CorruptStreamError` on any inconsistency.

    ``damaged=True`` (the caller knows some indices were lost and will restore them) skips the checksum and
    maps out-of-range values to 0; the layout must still be valid."""
    if not isinstance(stream, bytes | bytearray) or len(stream) < HEADER.size:
        raise CorruptStreamError("index stream is shorter than its 3-byte header")
    coder, checksum = HEADER.unpack_from(stream)
    payload = bytes(stream[HEADER.size :])
    if coder == FIXED_LENGTH:
        indices = torch.from_numpy(unpack_fixed_length(payload, h * w, k, damaged).reshape(h, w))
    elif coder == RANS:
        if model is None:
            raise CorruptStreamError("index stream is rANS coded but this codec has no index model")
        indices = model.decode(payload, h, w, damaged)
    else:
        raise CorruptStreamError(f"unknown index coder id {coder}")
    if not damaged and index_checksum(indices.numpy()) != checksum:
        raise CorruptStreamError("index stream checksum mismatch: the stream is corrupt or for another codebook")
    return indices


def lost_positions(h: int, w: int, k: int, missing_bytes: list[tuple[int, int]]) -> Tensor:
    """(h, w) bool mask of the indices touched by missing byte ranges ``[(start, stop), ...]`` of a
    fixed-length stream (offsets into the whole stream, header included). Use it to mark lost chunks."""
    bits = bits_per_index(k)
    mask = torch.zeros(h * w, dtype=torch.bool)
    for start, stop in missing_bytes:
        first_bit = max(0, (start - HEADER.size) * 8)
        last_bit = (stop - HEADER.size) * 8
        if last_bit <= 0:
            continue
        mask[first_bit // bits : min(h * w, -(-last_bit // bits))] = True
    return mask.reshape(h, w)
