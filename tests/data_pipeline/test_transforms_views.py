import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.transforms import (
    CorruptImage,
    ImageConfig,
    as_nchw,
    decode_resize_crop,
    device_preprocess,
    normalize,
)
from data_pipeline.views import SimCLRViews, ViewConfig


def _jpeg(w, h, colour=(200, 30, 90)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("w,h", [(64, 48), (48, 64), (20, 20), (300, 100)])
def test_decode_resize_crop_gives_square_uint8(w, h):
    out = decode_resize_crop(_jpeg(w, h), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # A flat image stays (nearly) flat through JPEG, resize and crop.
    assert abs(out[..., 0].astype(float).mean() - 200) < 6


def test_png_with_alpha_and_grayscale_become_rgb():
    for mode in ("RGBA", "L"):
        buf = io.BytesIO()
        Image.new(mode, (40, 40)).save(buf, format="PNG")
        assert decode_resize_crop(buf.getvalue(), 16).shape == (16, 16, 3)


@pytest.mark.parametrize("data", [b"", b"\xff\xd8garbage", None])
def test_corrupt_bytes_raise(data):
    if data is None:
        data = _jpeg(64, 64)[:200]  # truncated JPEG
    with pytest.raises(CorruptImage):
        decode_resize_crop(data, 16)


def test_normalize_matches_formula():
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = normalize(images, mean, std)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(normalize(images.float() / 255, mean, std), expected)


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


def test_centre_square_is_what_gets_resized():
    # Left half red, right half blue, 96 x 32: the centred 32 x 32 square is half of
    # each, so the result's left and right edges keep their colours.
    img = Image.new("RGB", (96, 32), (255, 0, 0))
    img.paste((0, 0, 255), (48, 0, 96, 32))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = decode_resize_crop(buf.getvalue(), 16)
    assert out[:, 0, 0].min() > 200 and out[:, -1, 2].min() > 200


def test_nchw_view_and_device_preprocess():
    arrays = [decode_resize_crop(_jpeg(40, 40, (10 * i, 0, 0)), 32) for i in range(3)]
    batch = as_nchw(torch.from_numpy(np.stack(arrays)))
    assert batch.shape == (3, 3, 32, 32)
    assert torch.equal(batch[1], torch.from_numpy(arrays[1].copy()).permute(2, 0, 1))
    config = ImageConfig(size=24, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out = device_preprocess(batch, config)
    assert out.shape == (3, 3, 24, 24) and out.dtype == torch.float32
    # A flat image stays flat through the resize: same value as without resizing.
    same_size = device_preprocess(batch, ImageConfig(size=32, mean=(0.0,) * 3, std=(1.0,) * 3))
    torch.testing.assert_close(out.mean(dim=(2, 3)), same_size.mean(dim=(2, 3)), atol=2e-3, rtol=0)
