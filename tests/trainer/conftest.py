"""The trainer tests' tiny shard set and two finished runs (CLIP, SimCLR), built once per
session (tests/trainer/runs.py). Tests that change a run work on a copy of it."""

import pytest

from tests.trainer.runs import ZERO2, overrides, train, write_data


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def zero2_run(data, tmp_path_factory):
    """One rank, ZeRO 2 (its optimizer partitions are a file of their own), 2 steps, a
    checkpoint at step 2."""
    run = tmp_path_factory.mktemp("zero2") / "run"
    proc = train(overrides(data, run, **ZERO2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def simclr_run(data, tmp_path_factory):
    """A SimCLR run like zero2_run: tiny ResNet, one rank, ZeRO 2, 2 steps."""
    run = tmp_path_factory.mktemp("simclr") / "run"
    proc = train(overrides(data, run, task="simclr", **{"model.preset": "tiny-resnet", **ZERO2}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run
