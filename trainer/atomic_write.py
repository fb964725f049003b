"""Files and folders that are never seen half written: ``megabatch export``'s model
folder, ``megabatch submit k8s``'s manifests and ``megabatch embed``'s parquet file are
built beside their final name and renamed into place when complete."""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class PathExists(FileExistsError):
    """``out`` appeared while it was written, and may not be replaced."""


@contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty folder ``.OUT.partial-PID`` beside ``out`` to write into. When the
    block finishes it becomes ``out`` (an existing ``out`` is renamed aside first and
    removed after, when ``overwrite``; FolderExists otherwise); when the block raises
    (SystemExit and KeyboardInterrupt included) it is removed. A process killed outright
    leaves only the hidden partial folder, which the next call for ``out`` removes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            if not overwrite:  # appeared while the block wrote
                raise PathExists(f"{out} exists (pass --overwrite to replace it)")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed


@contextmanager
def atomic_file(out: Path, overwrite: bool) -> Iterator[Path]:
    """``atomic_folder`` for one file: yield the path ``.OUT.partial-PID`` beside ``out``
    to write; renamed to ``out`` when the block finishes (PathExists if ``out`` appeared
    meanwhile and not ``overwrite``), removed when it raises."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        stale.unlink(missing_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        yield tmp
        if out.exists() and not overwrite:
            raise PathExists(f"{out} exists (pass --overwrite to replace it)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # gone already when renamed
