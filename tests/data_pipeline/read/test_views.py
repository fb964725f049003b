"""SimCLR's two views: replayable by seed, different otherwise."""

import torch

from megabatch.data_pipeline.read.views import SimCLRViews, ViewConfig


def test_views_are_replayable_by_seed_and_differ_otherwise():
    views = SimCLRViews(ViewConfig(size=16))
    images = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a1, a2 = views(images, seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    b1, b2 = views(images, seed=7)
    assert a1.shape == (4, 3, 16, 16) and a1.dtype == torch.float32
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)  # two different views of the same images
    c1, _ = views(images, seed=8)
    assert not torch.equal(a1, c1)
