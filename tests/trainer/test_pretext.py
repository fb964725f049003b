"""The pretext tasks (trainer/methods/rotation.py, relative_patch.py, jigsaw.py, their
shared pretext.py and patches.py; models/pretext.py): the labels say what was done to
the image, the geometry is the documented one, the jigsaw permutation set keeps its
promise, a seed replays its draw, and the model's shapes and checks."""

import numpy as np
import pytest
import torch

from megabatch.data_pipeline.read.transforms import device_preprocess, normalize
from megabatch.trainer.config import ConfigError, load_config
from megabatch.trainer.methods.jigsaw import JigsawTask, permutation_set
from megabatch.trainer.methods.patches import Grid, crop, encoder_inputs
from megabatch.trainer.methods.relative_patch import RelativePatchTask, neighbour_offset
from megabatch.trainer.methods.rotation import RotationTask, rotated
from megabatch.trainer.tasks import make_task

CPU = torch.device("cpu")
DIGITS = ["model.preset=tiny-resnet", "model.image_size=32", "data.load_size=48"]


def _task(name: str, *extra: str):
    return make_task(load_config(None, [f"task={name}", *DIGITS, *extra]), CPU, 1, None)


def _images(batch: int = 16, side: int = 48, seed: int = 0) -> torch.Tensor:
    """(B, 3, L, L) uint8 in channels-last memory, as the loader hands them over."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch, side, side, 3), generator=g, dtype=torch.uint8)
    return pixels.permute(0, 3, 1, 2)


def _generator(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- rotation
def test_rotation_inputs_are_the_image_turned_by_their_label():
    task = _task("rotation")
    images = _images(64)
    inputs, labels = task.examples(images, _generator())
    assert inputs.shape == (64, 1, 3, 32, 32) and labels.dtype == torch.int64
    assert set(labels.tolist()) == {0, 1, 2, 3}
    whole = device_preprocess(images, task.image)
    for b in range(len(images)):
        assert torch.equal(inputs[b, 0], torch.rot90(whole[b], int(labels[b]), dims=(1, 2)))


def test_rotated_turns_anticlockwise():
    image = torch.tensor([[1, 2], [3, 4]])[None, None]  # (1, 1, 2, 2)
    assert rotated(image, torch.tensor([1]))[0, 0].tolist() == [[2, 4], [1, 3]]
    assert rotated(image, torch.tensor([2]))[0, 0].tolist() == [[4, 3], [2, 1]]


# --------------------------------------------------------------------------- the grid
def test_grid_patches_stay_in_their_cells_with_the_whole_jitter_range():
    grid = Grid(48, patch=10, jitter=2)
    positions = grid.positions(256, _generator())
    assert positions.shape == (256, 9, 2)
    cells = torch.stack([torch.arange(9) // 3, torch.arange(9) % 3], -1) * 16  # cell corners
    inside = positions - cells
    assert inside.min() >= 0 and inside.max() <= 16 - 10
    jitter = inside - (16 - 10) // 2
    assert set(jitter.flatten().tolist()) == {-2, -1, 0, 1, 2}


def test_a_grid_that_cannot_hold_its_patches_is_one_line():
    with pytest.raises(ValueError, match="a patch of 17 px does not fit a 16 px cell"):
        Grid(48, patch=17, jitter=0)
    with pytest.raises(ValueError, match="jitter 4 px would move a 10 px patch out of its"):
        Grid(48, patch=10, jitter=4)


def test_crop_is_the_slice_at_each_position():
    images = _images(4)
    positions = torch.tensor([[[0, 0], [5, 30]], [[38, 38], [1, 2]], [[7, 9], [0, 38]],
                              [[20, 20], [38, 0]]])  # fmt: skip
    patches = crop(images, positions, 10)
    assert patches.shape == (4, 2, 3, 10, 10) and patches.dtype == torch.uint8
    for b in range(4):
        for i in range(2):
            top, left = positions[b, i].tolist()
            assert torch.equal(patches[b, i], images[b, :, top : top + 10, left : left + 10])


def test_encoder_inputs_normalise_the_dataset_way_or_each_patch_by_itself():
    from megabatch.data_pipeline.read.transforms import ImageConfig

    image = ImageConfig(size=16)
    patches = crop(_images(2), torch.tensor([[[0, 0], [10, 10]], [[3, 4], [20, 30]]]), 12)
    patches[1, 1] = 200  # a blank patch: stays blank, not blown up
    shared = encoder_inputs(patches, 16, image, each_normalised=False)
    resized = torch.nn.functional.interpolate(patches.flatten(0, 1).float() / 255, size=(16, 16),
                                              mode="bilinear", antialias=True)  # fmt: skip
    assert shared.shape == (2, 2, 3, 16, 16)
    torch.testing.assert_close(shared.flatten(0, 1), normalize(resized.clamp(0, 1), image.mean,
                                                                image.std))  # fmt: skip
    each = encoder_inputs(patches, 16, image, each_normalised=True)
    means, stds = each.mean(dim=(-2, -1)), each.std(dim=(-2, -1))
    torch.testing.assert_close(means, torch.zeros_like(means), atol=1e-5, rtol=0)
    torch.testing.assert_close(stds[:1], torch.ones_like(stds[:1]))  # per channel
    torch.testing.assert_close(each[1, 1], torch.zeros_like(each[1, 1]), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- relative patch
def test_relative_patch_pairs_the_centre_with_the_neighbour_its_label_names():
    task = _task("relative_patch")
    assert task.grid == Grid(48, patch=10, jitter=2)  # 2/3 of a 16 px cell, a third of the gap
    images = _images(256)
    patches, labels, positions = task.patches(images, _generator())
    assert patches.shape == (256, 2, 3, 10, 10) and set(labels.tolist()) == set(range(8))
    centre = positions[:, 0] - (16 + 3)  # the centre cell's corner and centring
    assert centre.abs().max() <= 2
    for b in range(len(images)):
        rows, cols = neighbour_offset(int(labels[b]))
        step = positions[b, 1] - positions[b, 0] - 16 * torch.tensor([rows, cols])
        assert step.abs().max() <= 2 * 2, (b, step)  # both patches jittered by at most 2
        for i in range(2):
            top, left = positions[b, i].tolist()
            assert torch.equal(patches[b, i], images[b, :, top : top + 10, left : left + 10])
    inputs, same_labels = task.examples(images, _generator())
    assert inputs.shape == (256, 2, 3, 16, 16) and torch.equal(same_labels, labels)


def test_neighbour_labels_go_round_the_centre_row_by_row():
    assert [neighbour_offset(k) for k in range(8)] == [
        (-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]  # fmt: skip


# --------------------------------------------------------------------------- jigsaw
def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a[:, None, :] != b[None, :, :]).sum(-1)


def test_the_permutation_set_is_the_greedy_maximal_minimum_distance_one():
    import itertools

    chosen = permutation_set(100, seed=0)
    assert chosen.shape == (100, 9)
    assert (np.sort(chosen, axis=1) == np.arange(9)).all()  # each a permutation of the tiles
    assert len({tuple(p) for p in chosen}) == 100
    pairwise = _hamming(chosen, chosen) + 10 * np.eye(100, dtype=int)
    smallest = pairwise.min()
    assert smallest >= 6 and (pairwise.sum() - 1000) / (100 * 99) > 8.0  # mean, off-diagonal
    # The greedy promise: each pick was as far from the set before it as any permutation
    # could be, so no permutation of the nine tiles is farther than that from the set.
    every = np.array(list(itertools.permutations(range(9))), dtype=np.int8)
    nearest = np.full(len(every), 9)
    for p in chosen:
        np.minimum(nearest, (every != p).sum(1), out=nearest)
    assert nearest.max() == smallest
    # and each pick's distance to those before it never grows
    picks = [_hamming(chosen[k : k + 1], chosen[:k]).min() for k in range(1, 100)]
    assert picks == sorted(picks, reverse=True) and picks[-1] == smallest


def test_the_permutation_set_is_a_function_of_count_and_seed():
    first = permutation_set(30, seed=0)
    assert np.array_equal(first, permutation_set(30, seed=0))
    assert np.array_equal(first[:10], permutation_set(10, seed=0))  # greedy: a prefix
    assert not np.array_equal(first, permutation_set(30, seed=1))


def test_jigsaw_tiles_put_back_in_order_rebuild_the_image():
    task = _task("jigsaw", "method.permutations=20")
    assert task.classes == 20 and task.permutations.shape == (20, 9)
    images = _images(8)
    task.grid = Grid(48, patch=16, jitter=0)  # tiles that cover their cells exactly
    tiles, labels, _ = task.patches(images, _generator())
    order = task.permutations[labels]  # slot i shows cell order[i]
    in_place = tiles.gather(1, order.argsort(1)[:, :, None, None, None].expand_as(tiles))
    rows = in_place.reshape(8, 3, 3, 3, 16, 16)  # (B, row, column, C, y, x)
    rebuilt = rows.permute(0, 3, 1, 4, 2, 5).reshape(8, 3, 48, 48)
    assert torch.equal(rebuilt, images)


def test_jigsaw_tiles_are_jittered_crops_in_the_labels_order():
    task = _task("jigsaw")
    assert task.grid == Grid(48, patch=12, jitter=2)  # 3/4 of a 16 px cell, anywhere in it
    images = _images(32)
    tiles, labels, positions = task.patches(images, _generator())
    assert tiles.shape == (32, 9, 3, 12, 12)
    for b in range(32):
        for slot, cell in enumerate(task.permutations[labels[b]].tolist()):
            top, left = positions[b, cell].tolist()
            assert (top // 16, left // 16) == divmod(cell, 3)
            assert torch.equal(tiles[b, slot], images[b, :, top : top + 12, left : left + 12])
    inputs, _ = task.examples(images, _generator())  # each tile by itself, by default
    assert inputs.shape == (32, 9, 3, 16, 16)
    torch.testing.assert_close(inputs, encoder_inputs(tiles, 16, task.image, each_normalised=True))
    as_images = _task("jigsaw", "method.normalise_each_tile=false")
    inputs, _ = as_images.examples(images, _generator())
    torch.testing.assert_close(inputs, encoder_inputs(tiles, 16, task.image, each_normalised=False))


# --------------------------------------------------------------------------- all three
@pytest.mark.parametrize("name", ["rotation", "relative_patch", "jigsaw"])
def test_a_seed_replays_its_inputs_and_another_seed_does_not(name):
    task = _task(name)
    images = _images(8)
    a_inputs, a_labels = task.examples(images, _generator(5))
    b_inputs, b_labels = task.examples(images, _generator(5))
    assert torch.equal(a_inputs, b_inputs) and torch.equal(a_labels, b_labels)
    c_inputs, c_labels = task.examples(images, _generator(6))
    assert not (torch.equal(a_inputs, c_inputs) and torch.equal(a_labels, c_labels))


@pytest.mark.parametrize("name,k,classes", [("rotation", 1, 4), ("relative_patch", 2, 8),
                                            ("jigsaw", 9, 100)])  # fmt: skip
def test_the_model_classifies_k_inputs_and_hands_over_simclrs_encoder(name, k, classes):
    from megabatch.trainer import export_hf

    task = _task(name)
    assert task.step_kind == "accumulate" and task.loss_params(None) == {}
    model = task.build_model()
    inputs, labels = task.examples(_images(4), _generator())
    features = task.encode(model, (inputs, labels))
    assert list(features) == ["logits", "labels"] and features["logits"].shape == (4, classes)
    loss = task.loss(features, {})
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(features["logits"], labels))
    images = _images(4)
    batch = type("Batch", (), {"images": images, "to": lambda self, device: self})()
    evaluated = task.image_features(model, batch)  # the whole images, as SimCLR's
    assert evaluated.shape == (4, 256)
    assert torch.equal(evaluated, model.features(device_preprocess(images, task.image)))
    with pytest.raises(ValueError, match=f"expected {k} inputs per sample, got {k + 1}"):
        model(torch.randn(2, k + 1, 3, 16, 16))
    # The export's SimCLR path takes the encoder and drops the head, as for SimCLR.
    model.eval()
    encoder = export_hf.simclr_encoder("tiny-resnet", 32, model.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encoder(pixel_values=pixels).pooler_output.flatten(1),
                               model.features(pixels))  # fmt: skip


def test_the_pretext_models_head_width_follows_model_hidden_dim():
    model = _task("rotation", "model.hidden_dim=64").build_model()
    assert model.head[0].weight.shape == (64, 256)


def test_model_checks_name_what_the_patch_tasks_cannot_use():
    from megabatch.trainer.tasks import TASKS

    vit = load_config(None, ["task=jigsaw", "model.preset=vit-small", "model.image_size=32"])
    with pytest.raises(ValueError, match="task jigsaw needs a ResNet model.preset"):
        JigsawTask.check_model(vit, 1)
    RotationTask.check_model(load_config(None, ["task=rotation", "model.preset=vit-small"]), 1)
    small = load_config(None, ["task=relative_patch", "model.preset=tiny-resnet",
                               "model.image_size=16", "data.load_size=8"])  # fmt: skip
    with pytest.raises(ValueError, match="data.load_size .or model.image_size. must be >= 12"):
        RelativePatchTask.check_model(small, 1)
    with pytest.raises(ValueError, match="nope"):
        TASKS["rotation"].check_model(load_config(None, ["task=rotation", "model.preset=nope"]), 1)
    for name in ("rotation", "relative_patch", "jigsaw"):
        TASKS[name].check_model(load_config(None, [f"task={name}", *DIGITS]), 1)


def test_jigsaws_keys_are_checked_and_fixed_for_a_run():
    from megabatch.trainer.resume import Change, refused_changes

    with pytest.raises(ConfigError, match=r"method.permutations must be in \[2, 1000\], got 1"):
        load_config(None, ["task=jigsaw", "method.permutations=1"]).validate()
    assert load_config(None, []).method.permutations == 100
    change = Change("method.permutations", 100, 50)
    assert refused_changes([change]) == [change]
    assert refused_changes([change], for_eval=True) == [change]  # the classifier's width
    tiles = Change("method.normalise_each_tile", True, False)
    assert refused_changes([tiles]) == [tiles] and refused_changes([tiles], for_eval=True) == []


@pytest.mark.parametrize("name", ["rotation", "relative_patch", "jigsaw"])
def test_each_preset_is_demo_simclrs_budget_on_its_backbone(name):
    from megabatch.trainer.config import plain_dict

    def budget(config) -> dict:
        values = plain_dict(config)
        keys = {"model": ("preset", "image_size"), "data": ("train", "val", "load_size"),
                "batch": ("micro_batch_size", "accumulation_steps"), "train": ("max_steps",)}  # fmt: skip
        return {(s, k): values[s][k] for s, names in keys.items() for k in names}

    config = load_config(None, [f"preset=demo-{name}"])
    assert config.task == name and config.run_dir == f"runs/demo-{name}"
    assert budget(config) == budget(load_config(None, ["preset=demo-simclr"]))
    assert config.global_batch_size(2) == 512
