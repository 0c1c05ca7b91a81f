"""Image decoding, repair and CLIP preprocessing.

* Eval: bicubic resize to image_size x image_size (no aspect preservation, as the release).
* Train (``augment=True``): random resized crop, area scale [crop_scale_min, 1], aspect ratio
  [3/4, 4/3], bicubic (torchvision's RandomResizedCrop algorithm), then an optional horizontal
  flip (``flip``; keep it off for text reading and left/right questions).
* Normalise with the CLIP mean/std; output float32 [H, W, 3] (NHWC).
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageFile

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
_SCALE = (1.0 / (255.0 * CLIP_STD)).astype(np.float32)
_OFFSET = (CLIP_MEAN / CLIP_STD).astype(np.float32)

Image.MAX_IMAGE_PIXELS = None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited over white (not dropped to black)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 0 else 1.0
        return Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (arr.min(), arr.max()) if arr.size else (0.0, 1.0)
        arr = (arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    return img.convert("RGB")  # L, P, CMYK, YCbCr, 1, ...


def decode(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Encoded bytes -> RGB PIL image. `draft_size` lets JPEG decode at reduced scale (fast)."""
    img = Image.open(io.BytesIO(data))
    if draft_size and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    return to_rgb(img)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8[H, W, 3] RGB -> PNG bytes (lossless: how clip frames are stored)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def normalize(img: Image.Image) -> np.ndarray:
    """RGB uint8 PIL image -> CLIP-normalised float32 [H, W, 3]."""
    u8 = np.asarray(img)
    out = np.empty(u8.shape, np.float32)
    np.multiply(u8, _SCALE, out=out)  # no float64 / temporary copies: this is the hot loop
    out -= _OFFSET
    return out


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.5, 1.0),
                            ratio=(3.0 / 4.0, 4.0 / 3.0)) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop.get_params; returns a (left, top, right, bottom) box."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return (left, top, left + w, top + h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return (left, top, left + w, top + h)


def preprocess(img: Image.Image, image_size: int, rng: np.random.Generator | None = None, augment: bool = False,
               flip: bool = False, crop_scale_min: float = 0.5) -> np.ndarray:
    """RGB PIL image -> float32 [image_size, image_size, 3], CLIP-normalised (see module doc)."""
    size = (image_size, image_size)
    if augment:
        if rng is None:
            raise ValueError("augment=True needs an rng")
        box = random_resized_crop_box(img.width, img.height, rng, scale=(crop_scale_min, 1.0))
        out = img.resize(size, Image.BICUBIC, box=box)
        if flip and rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
    else:
        out = img if img.size == size else img.resize(size, Image.BICUBIC)
    return normalize(out)


def load_and_preprocess(data: bytes, image_size: int, rng: np.random.Generator | None = None, augment: bool = False,
                        flip: bool = False, crop_scale_min: float = 0.5) -> np.ndarray:
    """Encoded bytes -> float32 [image_size, image_size, 3]."""
    img = decode(data, draft_size=2 * image_size if augment else image_size)
    return preprocess(img, image_size, rng, augment, flip, crop_scale_min)


def repair_image(data: bytes) -> tuple[bytes, list[str], str]:
    """Validates encoded bytes for storage; returns (bytes to store, repairs made, source format).

    An RGB JPEG or PNG is stored as is. Any other mode (CMYK, grey, palette, alpha, 16-bit) is converted
    to RGB and re-encoded (PNG sources stay lossless PNG, others become JPEG q95). Raises
    `ValueError` when the bytes do not decode completely.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        img.load()
    except Exception as e:  # PIL raises many kinds
        raise ValueError(f"unreadable image: {type(e).__name__}: {e}") from None
    if img.width < 1 or img.height < 1:
        raise ValueError("empty image")
    repairs = []
    if fmt in ("JPEG", "PNG") and img.mode == "RGB":
        return data, repairs, fmt
    if img.mode != "RGB":
        repairs.append(f"mode_{img.mode}")
    if fmt not in ("JPEG", "PNG"):
        repairs.append(f"format_{fmt}")
    rgb = to_rgb(img)
    buf = io.BytesIO()
    if fmt == "PNG":
        rgb.save(buf, format="PNG")
    else:
        rgb.save(buf, format="JPEG", quality=95)
    return buf.getvalue(), repairs, fmt
