"""The shipped demo VQGAN codec on real photos held out from its training (scikit-image astronaut, chelsea)."""

import pytest
import torch

from effvision.codecs.vqgan.model import demo_weights_path, load_demo_codec
from effvision.codecs.vqgan.restoration import random_mask

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    return load_demo_codec()


@pytest.fixture(scope="module")
def photos():
    return [torch.from_numpy(getattr(skimage_data, name)()).permute(2, 0, 1)[None].float() / 255
            for name in ("astronaut", "chelsea")]


def test_shipped_weights_are_small():
    assert demo_weights_path().stat().st_size < 5_000_000


@pytest.mark.parametrize("k", [64, 1024])
def test_learned_index_coding_beats_fixed_length_on_real_photos(codec, photos, k):
    derived = codec if k == codec.codebook_size else codec.cluster(k)
    for x in photos:
        learned = derived.compress(x, coder="learned")
        fixed = derived.compress(x, coder="fixed")
        assert len(learned["strings"][0][0]) < len(fixed["strings"][0][0])
        assert torch.equal(derived.decompress(learned["strings"], learned["shape"])["x_hat"],
                           derived.decompress(fixed["strings"], fixed["shape"])["x_hat"])


def test_restoring_20_percent_lost_indices_beats_a_constant_fill(codec, photos):
    most_common = int(torch.bincount(codec.reference_maps.flatten(), minlength=codec.codebook_size).argmax())
    restored_error, constant_error = 0.0, 0.0
    for trial, x in enumerate(photos):
        indices = codec.encode_indices(x)
        reference = codec.decode_indices(indices, x.shape[-2:])
        lost = random_mask(indices.shape, 0.2, torch.Generator().manual_seed(trial))
        restored = codec.decode_indices(codec.restore_indices(indices, lost), x.shape[-2:])
        constant = codec.decode_indices(indices.masked_fill(lost, most_common), x.shape[-2:])
        restored_error += float(torch.mean((restored - reference) ** 2))
        constant_error += float(torch.mean((constant - reference) ** 2))
    assert restored_error < constant_error


def test_decompress_with_a_lost_mask_restores_through_the_bitstream(codec, photos):
    x = photos[1]
    out = codec.compress(x, coder="fixed")
    h, w = codec.index_grid(out["shape"])
    lost = random_mask((1, h, w), 0.2, torch.Generator().manual_seed(5))
    stream = bytearray(out["strings"][0][0])
    damaged = codec.decompress([[bytes(stream)]], out["shape"], lost=lost)["x_hat"]
    assert damaged.shape == x.shape
