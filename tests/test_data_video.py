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
    # an audio-only file: no video stream (in a media container); a WAV file is not a video container
    for path in (tmp_path / "a.mkv", tmp_path / "a.wav"):
        out = av.open(str(path), "w")
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        out.close()
    assert reason(str(tmp_path / "a.mkv")) == "no_video_stream"
    assert reason(str(tmp_path / "a.wav")) == "unsupported_container"
    # a playlist naming a file outside: refused before FFmpeg reads it
    (tmp_path / "list.m3u8").write_text(f"#EXTM3U\n#EXTINF:1,\n{tmp_path / 'a.mkv'}\n#EXT-X-ENDLIST\n")
    assert reason(str(tmp_path / "list.m3u8")) == "unsupported_container"
    (tmp_path / "list.ffconcat").write_text(f"ffconcat version 1.0\nfile '{tmp_path / 'a.mkv'}'\n")
    assert reason(str(tmp_path / "list.ffconcat")) == "unsupported_container"
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


def _video_text(num_videos: int, num_images: int = 0) -> str:
    from owl_jax.data import conversation as conv

    lines = [conv.SYSTEM_PROMPT] + [conv.HUMAN_PREFIX + conv.IMAGE_TAG] * num_images
    lines += [conv.HUMAN_PREFIX + conv.VIDEO_TAG] * num_videos
    return "\n".join(lines + [conv.HUMAN_PREFIX + "What happens?", "AI: it fades"])


def test_jsonl_rows_with_videos_are_built_and_bad_ones_counted(tmp_path):
    """The `video` field of released-format rows: the sampled frames stored per clip (PNG, the release's
    224 x 224 by default, here 16), and every bad row skipped with its reason and line."""
    import json
    import os

    from PIL import Image

    from owl_jax.data import prepare, records

    root, outside = tmp_path / "media", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    levels = write_video(root / "a.mkv", 12, container="matroska")
    write_video(root / "b.mkv", 2, container="matroska")
    write_video(outside / "secret.mkv", 5, container="matroska")
    os.symlink(outside / "secret.mkv", root / "link.mkv")
    Image.new("RGB", (20, 20), (9, 9, 9)).save(root / "i.jpg")
    write_video(root / "long.mkv", 30, container="matroska")
    data = (root / "long.mkv").read_bytes()
    (root / "cut.mkv").write_bytes(data[: len(data) // 2])
    (root / "junk.mp4").write_bytes(b"junk" * 100)
    rows = [
        {"video": ["a.mkv"], "text": _video_text(1)},  # 1: kept
        {"video": ["a.mkv", "b.mkv"], "image": ["i.jpg"], "text": _video_text(2, 1)},  # 2: kept
        {"video": ["a.mkv"], "text": _video_text(2)},  # 3: more tags than videos
        {"video": ["b.mkv", "a.mkv"], "text": _video_text(1)},  # 4: kept, the second video dropped
        {"video": ["gone.mkv"], "text": _video_text(1)},  # 5: missing
        {"video": ["../outside/secret.mkv"], "text": _video_text(1)},  # 6: outside the root
        {"video": ["link.mkv"], "text": _video_text(1)},  # 7: a symlink out
        {"video": ["cut.mkv"], "text": _video_text(1)},  # 8: cut
        {"video": ["junk.mp4"], "text": _video_text(1)},  # 9: not a video
        {"video": 7, "text": _video_text(1)},  # 10: not a path
    ]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert prepare.main([f"--jsonl={jsonl}", f"--images={root}", f"--out={tmp_path / 'out'}",
                         "--video_frame_size=16"]) == 0
    with open(os.path.join(records.builder_dir(str(tmp_path / "out"), "owl_jsonl"), "report.json")) as f:
        report = json.load(f)
    assert report["written"] == {"train": 3}
    assert report["counts"] == {"more_tags_than_videos": 1, "more_videos_than_tags": 1, "missing_video": 1,
                                "outside_image_root": 2, "video_truncated": 1, "video_unreadable": 1,
                                "bad_video_field": 1}
    assert report["examples"]["outside_image_root"] == ["train.jsonl:6 (../outside/secret.mkv)",
                                                        "train.jsonl:7 (link.mkv)"]
    assert report["examples"]["video_truncated"] == ["train.jsonl:8 (cut.mkv)"]

    src = records.data_source(str(tmp_path / "out"), "owl_jsonl", "train")
    got = sorted((records.as_str(src[i]["source"]), records.clips_of(src[i]), len(src[i]["images"]))
                 for i in range(len(src)))
    assert [(where, [len(c) for c in clips], n) for where, clips, n in got] == [
        ("train.jsonl:1", [4], 0), ("train.jsonl:2", [4, 4], 1), ("train.jsonl:4", [4], 0)]
    import io

    frames = [np.asarray(Image.open(io.BytesIO(f))) for f in got[0][1][0]]
    assert all(f.shape == (16, 16, 3) for f in frames)
    np.testing.assert_allclose([f.mean() for f in frames], [levels[i] for i in frame_indices(12)], atol=6)


def test_video_tags_become_runs_of_video_placeholders():
    """<|video|> -> P ids of -2 (as the release's processor), beside <image> -> P of -1; a clip whose
    placeholders do not fit is dropped with everything after it, as an image is."""
    from owl_jax.batch import IMAGE_PLACEHOLDER_ID, VIDEO_PLACEHOLDER_ID
    from owl_jax.data.text import encode_conversation, encode_prompt

    from conftest import CharTokenizer

    text = "sys\nHuman: <|video|>\nHuman: <image>\nHuman: <|video|>\nHuman: q\nAI: ab"
    enc = encode_conversation(text, CharTokenizer(), max_len=100, image_token_count=3, video_tags=True)
    ids = enc.ids.tolist()
    assert (enc.num_images, enc.num_image_tags, enc.num_videos, enc.num_video_tags) == (1, 1, 2, 2)
    runs = [(v, ids.count(v)) for v in (VIDEO_PLACEHOLDER_ID, IMAGE_PLACEHOLDER_ID)]
    assert runs == [(VIDEO_PLACEHOLDER_ID, 6), (IMAGE_PLACEHOLDER_ID, 3)]
    first_video, image = ids.index(VIDEO_PLACEHOLDER_ID), ids.index(IMAGE_PLACEHOLDER_ID)
    assert first_video < image and ids[first_video:first_video + 3] == [VIDEO_PLACEHOLDER_ID] * 3
    assert enc.loss_mask[ids.index(VIDEO_PLACEHOLDER_ID)] == 0 and enc.num_loss_tokens == 3  # "ab" + EOS
    # cut inside the second clip's placeholders: it and the rest go
    second_clip = [i for i, v in enumerate(ids) if v == VIDEO_PLACEHOLDER_ID][3]
    cut = encode_conversation(text, CharTokenizer(), max_len=second_clip + 2, image_token_count=3, video_tags=True)
    assert (cut.num_images, cut.num_videos, cut.truncated) == (1, 1, True)
    assert cut.ids.tolist().count(VIDEO_PLACEHOLDER_ID) == 3
    prompt = "sys\nHuman: <|video|>\nHuman: <image>\nAI: "
    ids = encode_prompt(prompt, CharTokenizer(), image_token_count=2, video_tags=True).tolist()
    assert ids.count(VIDEO_PLACEHOLDER_ID) == 2 and ids.count(IMAGE_PLACEHOLDER_ID) == 2
    # For the image model the tag is text, as before the video model existed.
    image_model = encode_conversation(text, CharTokenizer(), max_len=100, image_token_count=3)
    assert VIDEO_PLACEHOLDER_ID not in image_model.ids and image_model.num_videos == 0
    assert [t - 3 for t in image_model.ids[1:14]] == [ord(c) for c in "sys\nHuman: <|"]
