"""The kernel benchmark's measuring (not its timings)."""

import torch

from megabatch.kernels import benchmark
from megabatch.kernels.contrastive import _stacked


def test_cpu_peak_is_reset_so_an_earlier_larger_peak_hides_nothing():
    earlier = torch.ones(100 * 2**20 // 4)  # 100 MB resident, then returned to the OS
    del earlier
    benchmark._reset_peak_rss()
    before = benchmark._peak_rss()
    scratch = torch.ones(40 * 2**20 // 4)  # 40 MB, every page written
    grown = benchmark._peak_rss() - before
    del scratch
    assert 35 * 2**20 < grown < 60 * 2**20, grown


def test_ntxent_features_are_halves_of_one_tensor():
    a, b = benchmark._features(8, 4, torch.float32, "cpu")
    assert a.is_leaf and b.is_leaf and a.requires_grad and b.requires_grad
    assert _stacked(a, b)._base is not None  # stacked as a view, not a copy
    torch.testing.assert_close(a.norm(dim=1), torch.ones(8))
