"""Small images, caption folders and tar readers for the data_pipeline tests."""

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def save_image(path: Path, seed: int = 0, size: tuple[int, int] = (12, 10)) -> Path:
    """A noise image (so that JPEG sizes vary), format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3))
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (12, 10)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_caption_folder(
    root: Path, n: int, suffixes: tuple[str, ...] = (".jpg", ".png", ".webp"), captions=True
) -> Path:
    """``n`` images named img00.jpg, img01.png, ... (one in a subfolder) with
    ``imgNN.txt`` captions."""
    for i in range(n):
        folder = root / "sub" if i == 1 else root
        image = save_image(folder / f"img{i:02d}{suffixes[i % len(suffixes)]}", seed=i)
        if captions:
            image.with_suffix(".txt").write_text(f"caption number {i}\n", encoding="utf-8")
    return root


def read_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of (name, bytes) members, like an img2dataset shard."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path: to compare two outputs exactly."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
