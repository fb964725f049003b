"""Tests that need a real part of this machine (a Prometheus server, a Slurm, network
namespaces) skip without it, unless CI says the part must be there: ``.ci/run`` installs
them and sets MEGABATCH_REQUIRE_<PART>=1, so that a part it failed to provide fails the
run instead of quietly skipping its tests."""

import os

import pytest


def needs(part: str, why_not: str | None) -> pytest.MarkDecorator:
    """A skip mark for the tests of ``part`` (``why_not``: None when it is here); raises
    at collection when MEGABATCH_REQUIRE_<PART>=1 and it is not."""
    variable = f"MEGABATCH_REQUIRE_{part.upper()}"
    if why_not is not None and os.environ.get(variable) == "1":
        raise RuntimeError(f"{variable}=1 but {why_not}")
    return pytest.mark.skipif(why_not is not None, reason=why_not or "")
