"""Evaluation metrics on features whose right answers are known by construction."""

import pytest
import torch
import torch.nn.functional as F

from megabatch.trainer.evaluation import (
    class_embeddings,
    knn_top1,
    linear_probe_top1,
    retrieval_recall,
    zero_shot_top1,
)


def _clustered(n_per_class=30, classes=5, dim=16, noise=0.3, seed=0):
    centres = F.normalize(
        torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)), dim=1
    )
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[labels] + noise * torch.randn(len(labels), dim, generator=g) / dim**0.5
    return x, labels, centres


def test_zero_shot_with_class_embeddings_from_templates():
    x, labels, centres = _clustered()

    # A "text encoder" that maps a prompt to its class centre plus a template-specific
    # offset: averaging over templates cancels the offsets.
    def encode_text(tokens, mask):
        cls, tmpl = tokens[:, 0], tokens[:, 1]
        offsets = torch.stack([torch.full((16,), 0.5), torch.full((16,), -0.5)])
        return centres[cls] + offsets[tmpl]

    def tokenizer(prompts):
        ids = torch.tensor([[int(p.split(":")[1]), int(p.split(":")[0])] for p in prompts])
        return ids, torch.ones_like(ids, dtype=torch.bool)

    classes = class_embeddings(encode_text, tokenizer, [str(c) for c in range(5)], ["0:{}", "1:{}"])
    torch.testing.assert_close(classes.norm(dim=1), torch.ones(5))
    assert torch.equal((classes @ centres.T).argmax(dim=1), torch.arange(5))
    assert zero_shot_top1(x, labels, classes) == 1.0
    assert zero_shot_top1(x, (labels + 1) % 5, classes) == 0.0


def test_retrieval_recall_known_ranks():
    e = torch.eye(6)
    assert retrieval_recall(e, e)["i2t_r1"] == 1.0
    # Texts shifted by one: each image's own text is never first; R@5 of 6 is 5/6...
    # unless ties; here the right text has similarity 0 with 1 text above it.
    shifted = retrieval_recall(e, e.roll(1, dims=0), ks=(1, 2))
    assert shifted["i2t_r1"] == 0.0 and shifted["t2i_r1"] == 0.0
    assert shifted["i2t_r2"] == 1.0 and shifted["t2i_r2"] == 1.0


def test_linear_probe_and_knn_on_separable_and_random_features():
    x, y, _ = _clustered()
    xt, yt, _ = _clustered(seed=1)
    assert linear_probe_top1(x, y, xt, yt) > 0.95
    assert knn_top1(x, y, xt, yt, k=10) > 0.95
    noise = torch.randn_like(x)
    assert knn_top1(noise, y, torch.randn_like(xt), yt, k=10) < 0.5


@pytest.mark.parametrize("k", [1, 500])  # k larger than the training set is capped
def test_knn_k_edges(k):
    x, y, _ = _clustered(n_per_class=4)
    assert knn_top1(x, y, x, y, k=k) >= 0.9 if k == 1 else 0.0 <= knn_top1(x, y, x, y, k=k) <= 1.0
