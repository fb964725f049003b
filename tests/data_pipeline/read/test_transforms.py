"""Image work in the workers (decode, centre square, resize, straight into the batch) and
on the device (resize, normalise)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from megabatch.data_pipeline.read import transforms
from megabatch.data_pipeline.read.transforms import (
    CorruptImage,
    ImageConfig,
    as_nchw,
    check_decoder,
    decode_image,
    decode_into,
    decode_resize_crop,
    device_preprocess,
    jpeg_into,
    normalize,
)


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


def _encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _noise(w, h, mode="RGB", seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


# Images at the batch's side (32) go straight in; the others are cropped or resized first.
DECODE_CASES = {
    "jpeg at side": _encode(_noise(32, 32)),
    "jpeg 4:4:4": _encode(_noise(32, 32), subsampling=0),
    "progressive jpeg": _encode(_noise(32, 32), progressive=True),
    "grey jpeg": _encode(_noise(32, 32, "L")),
    "cmyk jpeg": _encode(_noise(32, 32, "CMYK")),
    "jpeg to crop": _encode(_noise(48, 32)),
    "jpeg to resize": _encode(_noise(70, 50)),
    "png with alpha": _encode(_noise(32, 32, "RGBA"), "PNG"),
}


def _reference_decode(data: bytes, size: int) -> np.ndarray:
    """The workers' decoding before it wrote into the batch: convert, crop or resize, copy."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (size, size))
        img = img.convert("RGB")
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = (left, top, left + side, top + side)
    if (width, height) != (size, size):
        if side == size:
            img = img.crop(square)
        else:
            img = img.resize((size, size), Image.Resampling.BILINEAR, box=square)
    return np.asarray(img, dtype=np.uint8)


@pytest.mark.parametrize("name", list(DECODE_CASES))
@pytest.mark.parametrize("decoder", ["pil", "auto"])
def test_decode_into_writes_the_decoded_pixels_in_place(name, decoder):
    data = DECODE_CASES[name]
    batch = np.full((3, 32, 32, 3), 7, dtype=np.uint8)
    decode_into(data, batch[1], decoder)
    assert np.array_equal(batch[1], _reference_decode(data, 32))
    assert np.array_equal(batch[1], np.asarray(decode_image(data, 32)))
    assert (batch[0] == 7).all() and (batch[2] == 7).all()  # the neighbours are untouched


def test_decode_image_skips_the_copy_for_rgb_at_side():
    image = decode_image(DECODE_CASES["jpeg at side"], 32)
    assert image.mode == "RGB" and image.size == (32, 32)
    # The decoded JPEG itself (PIL's convert("RGB") would have copied it).
    assert isinstance(image, JpegImagePlugin.JpegImageFile)


def test_simplejpeg_decodes_what_pil_decodes(monkeypatch):
    pytest.importorskip("simplejpeg")
    for name, data in DECODE_CASES.items():
        out = np.zeros((32, 32, 3), dtype=np.uint8)
        taken = jpeg_into(data, out)
        # Only JPEGs at the batch's side, colour or grey, are simplejpeg's.
        assert taken == (name in ("jpeg at side", "jpeg 4:4:4", "progressive jpeg", "grey jpeg"))
        if taken:
            assert np.array_equal(out, np.asarray(decode_image(data, 32))), name
    # A truncated JPEG is PIL's to judge: it raises CorruptImage whichever decoder runs.
    with pytest.raises(CorruptImage):
        decode_into(DECODE_CASES["jpeg at side"][:-40], np.zeros((32, 32, 3), np.uint8))


def test_without_simplejpeg_everything_goes_through_pil(monkeypatch):
    monkeypatch.setattr(transforms, "simplejpeg", None)
    out = np.zeros((32, 32, 3), dtype=np.uint8)
    assert not jpeg_into(DECODE_CASES["jpeg at side"], out)
    decode_into(DECODE_CASES["jpeg at side"], out)
    assert np.array_equal(out, np.asarray(decode_image(DECODE_CASES["jpeg at side"], 32)))
    with pytest.raises(ValueError, match="not installed"):
        check_decoder("simplejpeg")


def test_decoder_names_are_checked():
    check_decoder("auto")
    check_decoder("pil")
    with pytest.raises(ValueError, match="one of auto, pil, simplejpeg"):
        check_decoder("turbo")


def test_packing_falls_back_to_the_public_api(monkeypatch):
    real = Image._getencoder

    def changed(mode, name, args, *extra):  # our one-chunk call fails; tobytes' works
        if args == ("RGB", 0, 1):
            raise TypeError("a new signature")
        return real(mode, name, args, *extra)

    monkeypatch.setattr(Image, "_getencoder", changed)
    data = DECODE_CASES["jpeg to resize"]
    out = np.zeros((32, 32, 3), dtype=np.uint8)
    decode_into(data, out, "pil")
    assert np.array_equal(out, _reference_decode(data, 32))
