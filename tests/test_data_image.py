"""Image preprocessing (docs/design.md, 1.1) and repair of odd image files."""
import io

import numpy as np
import pytest
from PIL import Image

from owl_jax.data import image as im


def _bytes(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _halves(size=64):
    """Left half red, right half blue: flips are visible."""
    arr = np.zeros((size, size, 3), np.uint8)
    arr[:, : size // 2] = (255, 0, 0)
    arr[:, size // 2:] = (0, 0, 255)
    return Image.fromarray(arr)


def test_eval_resize_and_clip_normalisation():
    img = Image.new("RGB", (50, 30), (255, 128, 0))
    out = im.preprocess(img, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    expected = (np.array([255, 128, 0]) / 255.0 - im.CLIP_MEAN) / im.CLIP_STD
    np.testing.assert_allclose(out[8, 8], expected, rtol=1e-5, atol=1e-5)


def test_augment_is_deterministic_and_flip_is_switchable():
    img = _halves()
    a = im.preprocess(img, 32, np.random.default_rng(1), augment=True, flip=True)
    b = im.preprocess(img, 32, np.random.default_rng(1), augment=True, flip=True)
    np.testing.assert_array_equal(a, b)
    red_left = lambda x: x[:, :4, 0].mean() > x[:, -4:, 0].mean()  # noqa: E731
    with_flip = [red_left(im.preprocess(img, 32, np.random.default_rng(s), augment=True, flip=True))
                 for s in range(20)]
    no_flip = [red_left(im.preprocess(img, 32, np.random.default_rng(s), augment=True, flip=False))
               for s in range(20)]
    assert all(no_flip) and not all(with_flip) and any(with_flip)


def test_random_resized_crop_box_respects_scale():
    rng = np.random.default_rng(0)
    for _ in range(50):
        l, t, r, b = im.random_resized_crop_box(200, 100, rng, scale=(0.5, 1.0))
        assert 0 <= l < r <= 200 and 0 <= t < b <= 100
        assert (r - l) * (b - t) >= 0.5 * 200 * 100 * 0.97


@pytest.mark.parametrize("mode,fmt,repair", [
    ("CMYK", "JPEG", "mode_CMYK"), ("L", "PNG", "mode_L"), ("RGBA", "PNG", "mode_RGBA"), ("P", "PNG", "mode_P"),
    ("I;16", "PNG", "mode_I;16"), ("RGB", "BMP", "format_BMP"),
])
def test_repair_converts_to_rgb(mode, fmt, repair):
    img = _halves().convert(mode) if mode != "I;16" else Image.fromarray(
        (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    data, repairs, source_fmt = im.repair_image(_bytes(img, fmt))
    assert repair in repairs and source_fmt == fmt
    out = Image.open(io.BytesIO(data))
    assert out.mode == "RGB" and out.format in ("JPEG", "PNG") and out.size == (64, 64)


def test_repair_keeps_rgb_jpeg_and_png_bytes():
    for fmt in ("JPEG", "PNG"):
        raw = _bytes(_halves(), fmt)
        data, repairs, source_fmt = im.repair_image(raw)
        assert data is raw and repairs == [] and source_fmt == fmt


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert im.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("data", [b"", b"not an image", None])
def test_unreadable_raises(data):
    if data is None:  # a truncated JPEG
        data = _bytes(_halves(), "JPEG")[:200]
    with pytest.raises(ValueError):
        im.repair_image(data)


def test_load_and_preprocess_png_bytes():
    out = im.load_and_preprocess(_bytes(_halves().convert("L"), "PNG"), 8)
    assert out.shape == (8, 8, 3) and np.isfinite(out).all()
