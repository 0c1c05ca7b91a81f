"""Video clips for the video model: the release's frame sampling, decoding with PyAV, and every kind of
bad file refused with its reason."""
import av
import numpy as np
import pytest

from owl_jax.data.video import VideoError, count_frames, frame_indices, read_clip


def write_video(path, n: int, size: int = 32, container: str | None = None) -> list[int]:
    """n frames of flat grey levels (frame i: 20 i), mpeg4 at 10 fps; returns the levels."""
    out = av.open(str(path), "w", format=container)
    stream = out.add_stream("mpeg4", rate=10)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    levels = [min(20 * i, 255) for i in range(n)]
    out.start_encoding()  # the header, frames or not
    for level in levels:
        frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), level, np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return levels


def test_frame_indices_are_the_releases():
    """processing_mplug_owl.get_index: segment centres of the N - 1 gaps, duplicates for short clips."""
    assert frame_indices(100) == [12, 37, 62, 86]
    assert frame_indices(300) == [37, 112, 187, 261]
    assert frame_indices(8) == [0, 2, 4, 5]
    assert frame_indices(4) == [0, 1, 2, 2]
    assert frame_indices(2) == [0, 0, 0, 1]
    assert frame_indices(1) == [0, 0, 0, 0]
    assert frame_indices(100, 8) == [6, 18, 31, 43, 56, 68, 80, 93]


@pytest.mark.parametrize("container", ["mp4", "matroska"])
def test_read_clip_takes_the_sampled_frames(tmp_path, container):
    path = tmp_path / "clip.video"
    levels = write_video(path, 12, container=container)
    assert count_frames(str(path)) == 12
    clip = read_clip(str(path), count=4, size=16)
    assert clip.shape == (4, 16, 16, 3) and clip.dtype == np.uint8
    want = [levels[i] for i in frame_indices(12, 4)]  # [20, 80, 140, 180]: frames 1, 4, 7, 9
    np.testing.assert_allclose(clip.reshape(4, -1).mean(axis=1), want, atol=6)
    # bytes read as the path does
    np.testing.assert_array_equal(read_clip(path.read_bytes(), count=4, size=16), clip)


def test_bad_videos_are_refused_with_their_reason(tmp_path):
    def reason(source, **kw):
        with pytest.raises(VideoError) as e:
            read_clip(source, name="row 7", **kw)
        assert "row 7" in str(e.value)
        return e.value.reason

    assert reason(b"not a video at all") == "unreadable"
    (tmp_path / "x.png").write_bytes(b"")
    assert reason(str(tmp_path / "x.png")) == "unreadable"
    # an audio-only file: no video stream
    out = av.open(str(tmp_path / "a.wav"), "w")
    stream = out.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    for packet in stream.encode(frame):
        out.mux(packet)
    out.close()
    assert reason(str(tmp_path / "a.wav")) == "no_video_stream"
    # a video stream with no frames
    write_video(tmp_path / "empty.avi", 0, container="avi")
    assert reason(str(tmp_path / "empty.avi")) == "no_frames"
    # cut files: a streamable one decodes short, an mp4 loses its index
    write_video(tmp_path / "long.mkv", 30, container="matroska")
    data = (tmp_path / "long.mkv").read_bytes()
    assert reason(data[: len(data) // 2]) == "truncated"
    write_video(tmp_path / "long.mp4", 30, container="mp4")
    data = (tmp_path / "long.mp4").read_bytes()
    assert reason(data[: len(data) * 2 // 3]) == "unreadable"
    # over the frame limit: refused while counting, before any frame is kept
    assert reason(str(tmp_path / "long.mkv"), max_frames=20) == "too_many_frames"
