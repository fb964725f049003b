"""How the field judges contrastive encoders, on features already computed:

- zero-shot classification: class embeddings from prompt templates ("a photo of the
  digit {}."), averaged over templates and re-normalised (CLIP's prompt ensembling);
  an image's class is the nearest one by cosine;
- image-to-text and text-to-image retrieval, Recall@K over aligned pairs;
- a linear probe on frozen features (SimCLR's protocol: logistic regression, here
  scikit-learn's, on standardised features);
- k-nearest-neighbour accuracy (cosine, similarity-weighted votes, as in DINO).

All take (N, E) float tensors; features are L2-normalised where cosine is meant.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def class_embeddings(
    encode_text, tokenizer, classnames: list[str], templates: list[str]
) -> torch.Tensor:
    """(C, E) unit vectors: the mean over templates of each class's text features."""
    rows = []
    for name in classnames:
        tokens, mask = tokenizer([t.format(name) for t in templates])
        feats = F.normalize(encode_text(tokens, mask), dim=-1)  # (T, E)
        rows.append(F.normalize(feats.mean(dim=0), dim=-1))
    return torch.stack(rows)


def zero_shot_top1(
    image_features: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor
) -> float:
    predictions = (F.normalize(image_features, dim=-1) @ classes.T).argmax(dim=1)
    return (predictions == labels).float().mean().item()


def retrieval_recall(
    image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5, 10)
) -> dict[str, float]:
    """Pair i is (image i, text i). i2t R@K: share of images whose own text ranks in the
    top K of all texts; t2i likewise. Ties count against (strictly greater scores only
    push the right answer down)."""
    sim = F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T  # (N, N)
    own = sim.diagonal()
    i2t_rank = (sim > own[:, None]).sum(dim=1)  # texts scoring above the right one
    t2i_rank = (sim > own[None, :]).sum(dim=0)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item()
        out[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
    return out


def linear_probe_top1(
    train_x, train_y, test_x, test_y, c: float = 1.0, max_iter: int = 1000
) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(_np(train_x))
    clf = LogisticRegression(C=c, max_iter=max_iter)
    clf.fit(scaler.transform(_np(train_x)), _np(train_y))
    return float(clf.score(scaler.transform(_np(test_x)), _np(test_y)))


def knn_top1(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07) -> float:
    train_x, test_x = F.normalize(train_x.float(), dim=-1), F.normalize(test_x.float(), dim=-1)
    k = min(k, train_x.shape[0])
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    sim, idx = (test_x @ train_x.T).topk(k, dim=1)  # (N_test, k)
    votes = torch.zeros(test_x.shape[0], num_classes)
    votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
    return (votes.argmax(dim=1) == test_y).float().mean().item()


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
