"""A request's images and clips, from what a user hands over to what the model takes: CLIP-normalised
float32 [S, S, 3] images and [f, S, S, 3] clips at the model's image size."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from owl_jax.cli import UserError
from owl_jax.data.image import normalize, preprocess, to_rgb

ImageLike = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray [H, W, 3]
VideoLike = Any  # str | os.PathLike (a video file) | np.ndarray [f, H, W, 3] (frames)


def image_list(images) -> list:
    """One image or a list of them as a list (None: none)."""
    if images is None:
        return []
    if isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim == 3):
        return [images]
    return list(images)


def video_list(videos) -> list:
    """One clip or a list of them as a list (None: none)."""
    if videos is None:
        return []
    if isinstance(videos, (str, os.PathLike)) or (isinstance(videos, np.ndarray) and videos.ndim == 4):
        return [videos]
    return list(videos)


def load_image(image: ImageLike, image_size: int) -> np.ndarray:
    """Eval preprocessing: RGB, bicubic resize to image_size (no crop), CLIP mean/std, NHWC float32."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            if image.shape != (image_size, image_size, 3):
                raise ValueError(f"float image of shape {image.shape}: expected CLIP-normalised "
                                 f"[{image_size}, {image_size}, 3] (or pass uint8 pixels / a PIL image)")
            return image.astype(np.float32)
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        image = _decode_file(os.fspath(image))
    return preprocess(to_rgb(image), image_size)


def load_clip(video: VideoLike, image_size: int) -> np.ndarray:
    """A clip as the video model takes it: float32 [f, S, S, 3], CLIP-normalised.

    A video file gives the release's frames (`owl_jax.data.video.read_clip`: 4, sampled as the release
    samples them, resized to S x S while decoding); uint8 frames [f, H, W, 3] are resized each as an
    image is; float32 frames must already be [f, S, S, 3] and normalised."""
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[0] < 1 or video.shape[-1] != 3:
            raise ValueError(f"clip of shape {video.shape}: expected frames [f, H, W, 3] with f >= 1")
        return np.stack([load_image(frame, image_size) for frame in video])
    from owl_jax.data.video import VideoError, read_clip

    path = os.fspath(video)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video {path}: no such file")
    try:
        frames = read_clip(path, size=image_size, name=f"video {path}")
    except VideoError as e:
        raise UserError(f"{e} ({e.reason})") from None
    return np.stack([normalize(Image.fromarray(frame)) for frame in frames])


def _decode_file(path: str) -> Image.Image:
    """An image file, decoded in full now (any format PIL reads: a .jpg may hold a PNG). PIL's own
    errors (a truncated JPEG: "image file is truncated") do not say which file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"image {path}: no such file")
    try:
        with Image.open(path) as f:
            f.load()
            return to_rgb(f)
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"image {path}: cannot decode it ({type(e).__name__}: {e})") from None
