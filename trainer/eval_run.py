"""Evaluation of the current encoders on held-out shards (rank 0, no grad): encode the
val split (and part of train for the probe and kNN) and compute the field's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megabatch.data_pipeline.read.loader import ShardLoader
from megabatch.trainer import evaluation
from megabatch.trainer.config import RunConfig
from megabatch.trainer.data import loader_config


def _encode(task, model, spec, config: RunConfig, want_text: bool):
    loader = ShardLoader(loader_config(config, spec, captions=task.captions, evaluation=True),
                         tokenizer=task.tokenizer)  # fmt: skip
    images, texts, labels, n = [], [], [], 0
    for batch in loader:
        images.append(task.image_features(model, batch).float().cpu())
        if want_text:
            texts.append(task.text_features(model, batch).float().cpu())
        labels.append(torch.tensor([m.get("label", -1) for m in batch.meta]))
        n += len(batch)
        if n >= config.data.eval_max_samples:
            break
    return torch.cat(images), (torch.cat(texts) if texts else None), torch.cat(labels)


def _zero_shot_files(config: RunConfig) -> tuple[Path | None, Path | None]:
    classnames = Path(config.data.classnames) if config.data.classnames else None
    if classnames is None and isinstance(config.data.val, str):
        guess = Path(config.data.val).parent / "classnames.json"
        classnames = guess if guess.is_file() else None
    templates = Path(config.data.templates) if config.data.templates else None
    if templates is None and classnames is not None:
        guess = classnames.parent / "templates.json"
        templates = guess if guess.is_file() else None
    return classnames, templates


@torch.no_grad()
def evaluate(task, model, config: RunConfig) -> dict[str, float]:
    if config.data.val is None:
        return {}
    was_training = model.training
    model.eval()
    val_x, val_t, val_y = _encode(task, model, config.data.val, config, want_text=task.captions)
    results: dict[str, float] = {}
    if task.captions:
        recall = evaluation.retrieval_recall(val_x, val_t)
        results["retrieval_i2t_r1"], results["retrieval_t2i_r1"] = (
            recall["i2t_r1"],
            recall["t2i_r1"],
        )
        results["retrieval_i2t_r5"], results["retrieval_t2i_r5"] = (
            recall["i2t_r5"],
            recall["t2i_r5"],
        )
        classnames, templates = _zero_shot_files(config)
        if classnames is not None and (val_y >= 0).all():
            names = json.loads(classnames.read_text())
            prompts = json.loads(templates.read_text()) if templates else ["a photo of a {}."]

            def encode_text(tokens, mask):
                return model.encode_text(tokens.to(task.device), mask.to(task.device)).float().cpu()

            classes = evaluation.class_embeddings(encode_text, task.tokenizer, names, prompts)
            results["zeroshot_top1"] = evaluation.zero_shot_top1(val_x, val_y, classes)
    if (val_y >= 0).all() and config.data.train is not None:
        train_x, _, train_y = _encode(task, model, config.data.train, config, want_text=False)
        if (train_y >= 0).all():
            results["linear_probe_top1"] = evaluation.linear_probe_top1(
                train_x, train_y, val_x, val_y
            )
            results["knn_top1"] = evaluation.knn_top1(train_x, train_y, val_x, val_y)
    model.train(was_training)
    return results
