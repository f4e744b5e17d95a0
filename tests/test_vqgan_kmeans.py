"""K-means codebook clustering (Mao et al., DCC 2024): exactly K centroids, deterministic, decodable."""

import pytest
import torch

from effvision.codecs.vqgan.config import VQGANConfig
from effvision.codecs.vqgan.kmeans import kmeans
from effvision.codecs.vqgan.model import VQGANCodec

TINY = VQGANConfig(ch=32, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=1, attn_resolutions=(), resolution=32,
                   z_channels=32, embed_dim=8, n_embed=128, name="tiny")


@pytest.mark.parametrize("k", [1, 8, 50, 127])
def test_kmeans_returns_exactly_k_distinct_used_centroids(k):
    points = torch.randn(128, 8, generator=torch.Generator().manual_seed(k))
    result = kmeans(points, k, seed=3)
    assert result.centroids.shape == (k, 8)
    assert torch.unique(result.centroids, dim=0).shape[0] == k
    assert torch.unique(result.assignment).numel() == k


def test_kmeans_is_deterministic_for_a_seed():
    points = torch.randn(300, 16)
    first, second = kmeans(points, 20, seed=7), kmeans(points, 20, seed=7)
    assert torch.equal(first.centroids, second.centroids) and torch.equal(first.assignment, second.assignment)


def test_kmeans_with_k_equal_to_n_reproduces_the_points():
    points = torch.randn(40, 4, dtype=torch.float64)
    result = kmeans(points, 40, seed=0)
    assert torch.allclose(result.centroids[result.assignment], points)
    assert result.inertia == pytest.approx(0.0, abs=1e-12)


def test_kmeans_finds_the_means_of_well_separated_blobs():
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    offsets = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    points = (centres[:, None, :] + offsets[None]).reshape(-1, 2)
    result = kmeans(points, 3, seed=1)
    found = sorted(map(tuple, result.centroids.tolist()))
    assert found == sorted(map(tuple, centres.tolist()))


def test_usage_weights_pull_a_centroid_towards_heavy_points():
    points = torch.tensor([[0.0], [1.0], [10.0]])
    result = kmeans(points, 2, weights=torch.tensor([1.0, 3.0, 1.0]), seed=0)
    assert sorted(result.centroids.flatten().tolist()) == pytest.approx([0.75, 10.0])


def test_k_larger_than_the_codebook_is_a_clear_error():
    with pytest.raises(ValueError, match="K must be between 1 and 128"):
        kmeans(torch.randn(128, 8), 129)
    with pytest.raises(ValueError, match="K must be between 1 and 128"):
        VQGANCodec(TINY).cluster(200)


def test_clustered_codec_decodes_remapped_indices_with_its_centroids():
    torch.manual_seed(0)
    base = VQGANCodec(TINY, reference_maps=torch.randint(0, 128, (4, 3, 3))).eval()
    derived = base.cluster(16, seed=0)
    assert derived.codebook_size == 16 and derived.index_model.k == 16
    indices = base.encode_indices(torch.rand(1, 3, 32, 48))
    remapped = derived.cluster_assignment[indices]
    assert int(remapped.max()) < 16
    with torch.no_grad():
        expected = base.vq.decode_latent(derived.vq.quantize.embedding.weight[remapped].permute(0, 3, 1, 2))
    torch.testing.assert_close(derived.decode_indices(remapped, (32, 48)), ((expected + 1) / 2).clamp(0, 1))
    stream = derived.compress(torch.rand(1, 3, 32, 48))
    assert derived.decompress(stream["strings"], stream["shape"])["x_hat"].shape == (1, 3, 32, 48)
