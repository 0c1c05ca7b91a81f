"""Clips for the video model: the frames the release samples from a video file, decoded with PyAV.

The release (mplug_owl_video/processing_mplug_owl.py) reads a video with decord, resized to 224 x 224
while decoding (the aspect ratio not kept), and takes K frames (4 by default) at `frame_indices`:
the N - 1 frame gaps cut into K equal segments of s = (N - 1) / K, frame k at int(s / 2) + round(s k).
Short clips repeat frames (N = 2, K = 4: 0, 0, 0, 1). We sample the same frames; PyAV (FFmpeg) decodes
them and Pillow resizes them bicubically to size x size, so pixels differ from decord's by resampling
only.

A video is untrusted input: `read_clip` raises `VideoError` (its `reason` one of REASONS) for a file
FFmpeg cannot open, a container that is not a plain media file (a playlist or concat list could name
files anywhere, outside the data root), one without a video stream or frames, one whose stream
breaks off, and one over the frame or pixel limits; the data builder counts each as a skip of its row.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from owl_jax.cli import UserError

REASONS = ("unreadable", "unsupported_container", "no_video_stream", "no_frames", "truncated", "too_many_frames",
           "too_large")
# FFmpeg's demuxers of self-contained media files. Others (hls, concat, dash, image2, ...) read further
# files that the container names, which the data root's containment check never sees.
CONTAINERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "mpegts", "mpeg", "flv", "asf", "ogg", "gif")
_PLAYLIST_MAGIC = (b"#EXTM3U", b"ffconcat", b"<?xml", b"<MPD")
DEFAULT_FRAMES = 4  # the release's num_frames
MAX_FRAMES = 36_000  # 20 minutes at 30 fps: a longer file is refused before any frame is kept
MAX_PIXELS = 4096 * 4096  # per frame


class VideoError(ValueError):
    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


def frame_indices(num_frames: int, count: int = DEFAULT_FRAMES) -> list[int]:
    """The release's `get_index`: `count` frame indices of a video of `num_frames` frames."""
    segment = (num_frames - 1) / count
    start = int(segment / 2)
    return [start + int(np.round(segment * k)) for k in range(count)]


def _av():
    try:
        import av  # the `video` extra
    except ImportError:
        raise UserError("reading videos needs PyAV: pip install 'owl_jax[video]'") from None
    return av


def _open(source: str | bytes, name: str):
    av = _av()
    try:
        if isinstance(source, bytes):
            head = source[:64]
        else:
            with open(source, "rb") as f:
                head = f.read(64)
    except OSError as e:
        raise VideoError("unreadable", f"{name}: cannot read it ({e})") from e
    if head.lstrip().startswith(_PLAYLIST_MAGIC):  # refused before FFmpeg would follow what it names
        raise VideoError("unsupported_container", f"{name}: a playlist or list of files, not a video file")
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else source, metadata_errors="replace")
    except (av.error.FFmpegError, OSError, ValueError, MemoryError) as e:
        raise VideoError("unreadable", f"{name}: not a video FFmpeg can open ({e})") from e
    try:
        if container.format.name not in CONTAINERS:
            raise VideoError("unsupported_container", f"{name}: container {container.format.name!r} is not one of "
                                                      f"{', '.join(CONTAINERS)}")
        if not container.streams.video:
            raise VideoError("no_video_stream", f"{name}: holds no video stream")
        context = container.streams.video[0].codec_context
        if context.width * context.height > MAX_PIXELS:
            raise VideoError("too_large", f"{name}: frames of {context.width} x {context.height} pixels, over "
                                          f"{MAX_PIXELS}")
    except VideoError:
        container.close()
        raise
    return container


def _frames(container, name: str, max_frames: int):
    """Decoded frames of the first video stream, one by one."""
    av = _av()
    stream = container.streams.video[0]
    try:
        for i, frame in enumerate(container.decode(stream)):
            if i >= max_frames:
                raise VideoError("too_many_frames", f"{name}: more than {max_frames} frames")
            if frame.width * frame.height > MAX_PIXELS:  # a stream may change size midway
                raise VideoError("too_large", f"{name}: frames of {frame.width} x {frame.height} pixels, over "
                                              f"{MAX_PIXELS}")
            yield frame
    except VideoError:
        raise
    except (av.error.FFmpegError, ValueError, MemoryError) as e:
        raise VideoError("truncated", f"{name}: the video stream breaks off ({e})") from e


def _declared_frames(container) -> int | None:
    """The frame count the container states: the video stream's own, else its duration x frame rate
    (the stream's, not the container's: an audio track may run longer)."""
    stream = container.streams.video[0]
    if stream.frames:
        return int(stream.frames)
    if not stream.average_rate:
        return None
    if stream.duration and stream.time_base:
        return round(float(stream.duration * stream.time_base) * float(stream.average_rate))
    if container.duration and len(container.streams) == 1:  # Matroska states only the file's duration
        return round(container.duration / 1e6 * float(stream.average_rate))
    return None


def count_frames(source: str | bytes, name: str = "video", max_frames: int = MAX_FRAMES) -> int:
    """Frames in the file's first video stream, by decoding it (container headers may not say). A
    stream that decodes to under 90% of the frames its container states has lost its end: FFmpeg
    decodes what is there without an error, so that is how a cut file shows."""
    container = _open(source, name)
    try:
        n = sum(1 for _ in _frames(container, name, max_frames))
        declared = _declared_frames(container)
    finally:
        container.close()
    if n == 0:
        raise VideoError("no_frames", f"{name}: its video stream has no frames")
    if declared and n < 0.9 * declared:
        raise VideoError("truncated", f"{name}: decodes to {n} frames of the {declared} its container states")
    return n


def read_clip(source: str | bytes, count: int = DEFAULT_FRAMES, size: int = 224, name: str = "video",
              max_frames: int = MAX_FRAMES) -> np.ndarray:
    """uint8[count, size, size, 3]: the release's `count` frames of a video file (path or bytes), RGB,
    resized to size x size. Raises VideoError."""
    n = count_frames(source, name, max_frames)
    wanted = frame_indices(n, count)
    kept: dict[int, np.ndarray] = {}
    container = _open(source, name)
    try:
        for i, frame in enumerate(_frames(container, name, max_frames)):
            if i in wanted:
                try:
                    img = frame.to_image().convert("RGB").resize((size, size), Image.BICUBIC)
                except (ValueError, MemoryError) as e:  # a pixel format PIL cannot take
                    raise VideoError("unreadable", f"{name}: frame {i} does not convert to RGB ({e})") from e
                kept[i] = np.asarray(img, np.uint8)
            if i >= wanted[-1]:
                break
    finally:
        container.close()
    if len(kept) < len(set(wanted)):  # a second decode that ends early: the file changed or breaks off
        raise VideoError("truncated", f"{name}: decoded {len(kept)} of the frames {sorted(set(wanted))}")
    return np.stack([kept[i] for i in wanted])
