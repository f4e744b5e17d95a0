"""MaskGIT-style restoration of lost indices (Chang et al., 2022; Mao et al., DCC 2024)."""

import torch

from effvision.codecs.vqgan.restoration import IndexRestorer, random_mask


def test_random_mask_hides_exactly_the_requested_share():
    mask = random_mask((3, 10, 10), torch.tensor([0.2, 0.5, 0.0]), torch.Generator().manual_seed(0))
    assert mask.flatten(1).sum(1).tolist() == [20, 50, 1]  # at least one position is always masked


def test_restore_fills_every_lost_index_and_keeps_the_others():
    torch.manual_seed(0)
    restorer = IndexRestorer(code_dim=8, dim=32, depth=1, heads=2).eval()
    codebook = torch.randn(20, 8)
    indices = torch.randint(0, 20, (2, 5, 6))
    lost = random_mask(indices.shape, 0.4)
    restored = restorer.restore(indices, lost, codebook, iterations=3)
    assert torch.equal(restored[~lost], indices[~lost])
    assert int(restored.min()) >= 0 and int(restored.max()) < 20


def test_restorer_accepts_any_codebook_size():
    restorer = IndexRestorer(code_dim=8, dim=32, depth=1, heads=2)
    indices = torch.randint(0, 5, (1, 3, 4))
    for k in (5, 300):
        assert restorer(indices, torch.zeros_like(indices, dtype=torch.bool), torch.randn(k, 8)).shape == (1, 3, 4, k)


def test_masked_positions_do_not_see_their_true_index():
    torch.manual_seed(0)
    restorer = IndexRestorer(code_dim=8, dim=32, depth=1, heads=2).eval()
    codebook = torch.randn(10, 8)
    indices = torch.randint(0, 10, (1, 4, 4))
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    changed = indices.clone()
    changed[0, 1, 2] = (indices[0, 1, 2] + 1) % 10
    with torch.no_grad():
        assert torch.equal(restorer(indices, mask, codebook), restorer(changed, mask, codebook))


class _FixedBelief(IndexRestorer):
    """Predicts the same distribution everywhere: half on entry 0, half on entry 1, nothing on entry 2."""

    def forward(self, indices, mask, codebook):
        logits = torch.tensor([0.0, 0.0, -1e4]).expand(*indices.shape, 3)
        return logits.clone()


def test_mmse_decision_picks_the_entry_nearest_the_posterior_mean():
    restorer = _FixedBelief(code_dim=1, dim=32, depth=1, heads=2)
    codebook = torch.tensor([[-1.0], [1.0], [0.1]])  # entry 2 sits next to the mean of entries 0 and 1
    indices = torch.zeros(1, 2, 2, dtype=torch.long)
    lost = torch.ones(1, 2, 2, dtype=torch.bool)
    assert restorer.restore(indices, lost, codebook, decision="mmse").unique().tolist() == [2]
    assert set(restorer.restore(indices, lost, codebook, decision="argmax").unique().tolist()) <= {0, 1}
