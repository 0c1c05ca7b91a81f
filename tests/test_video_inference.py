"""The video model in generation: the cached decode against a full forward, a batch mixing image,
video and text-only prompts against each prompt alone, the API with clips (files and frames), and
`python -m owl_jax.generate --video`."""
import dataclasses

import jax
import numpy as np
import pytest
from test_data_video import write_video
from test_generate import _forward_step_logits as forward_step_logits
from test_video import video_config

from owl_jax.batch import IMAGE_PLACEHOLDER_ID, VIDEO_PLACEHOLDER_ID
from owl_jax.inference.engine import Generator, Sampling, make_batch

from conftest import peaked_params


@pytest.fixture(scope="module")
def video_owl():
    cfg = video_config()
    return cfg, jax.device_put(peaked_params(cfg, seed=3))


def _requests(cfg, rng):
    """Four prompts: text only, an image, a 3-frame clip, an image and clips of 2 and 4 frames."""
    p, size = cfg.tokens_per_image, cfg.vision.image_size
    text = lambda n: list(rng.integers(3, cfg.llm.vocab_size, size=n))
    image, video = [IMAGE_PLACEHOLDER_ID] * p, [VIDEO_PLACEHOLDER_ID] * p
    prompts = [[1] + text(7), [1] + text(2) + image + text(4), [1] + text(3) + video + text(2),
               [1] + text(1) + image + text(1) + video + text(2) + video + text(3)]
    images = list(rng.normal(size=(2, size, size, 3)).astype(np.float32))
    clips = [rng.normal(size=(f, size, size, 3)).astype(np.float32) for f in (3, 2, 4)]
    return ([np.asarray(x, np.int32) for x in prompts], images, [0, 1, 0, 1], clips, [0, 0, 1, 2])


def test_cached_decode_equals_the_full_forward_and_each_prompt_alone(video_owl, rng):
    cfg, params = video_owl
    prompts, images, num_images, clips, num_videos = _requests(cfg, rng)
    batch = make_batch(prompts, images, num_images, cfg, clips=clips, num_videos=num_videos)
    assert batch.videos.pixel_values.shape[:2] == (4, 4) and batch.videos.frames.tolist() == [3, 2, 4, 0]
    steps = 6
    gen = Generator(params, cfg)
    together = gen.generate(batch, Sampling(max_new_tokens=steps), return_logits=True, disable_eos=True)
    expected = forward_step_logits(cfg, params, batch, together["tokens"])
    np.testing.assert_allclose(together["logits"], expected, atol=1e-4, rtol=0)
    assert (together["tokens"] == expected.argmax(-1)).all()
    image_at, clip_at = np.cumsum([0] + num_images), np.cumsum([0] + num_videos)
    for i, prompt in enumerate(prompts):
        alone = gen.generate(
            make_batch([prompt], images[image_at[i]:image_at[i + 1]], [num_images[i]], cfg,
                       clips=clips[clip_at[i]:clip_at[i + 1]], num_videos=[num_videos[i]]),
            Sampling(max_new_tokens=steps), return_logits=True, disable_eos=True)
        assert alone["tokens"][0].tolist() == together["tokens"][i].tolist(), i
        # A batch of one reduces in another order than a batch of four: float32 rounding, peaked weights
        # and six steps move a logit of ~5 by up to 1.5e-4 on some hosts; in float64 the two agree to 2e-13.
        np.testing.assert_allclose(alone["logits"][0], together["logits"][i], atol=5e-4, rtol=0)
    # The clips count: another frame in the 3-frame clip moves the logits of its prompt only.
    moved = [c.copy() for c in clips]
    moved[0][2] += 1.0
    other = gen.generate(make_batch(prompts, images, num_images, cfg, clips=moved, num_videos=num_videos),
                         Sampling(max_new_tokens=1), return_logits=True)
    change = np.abs(other["logits"][:, 0] - together["logits"][:, 0]).max(axis=-1)
    assert change[2] > 1e-2 and change[[0, 1, 3]].max() == 0, change


def test_a_clip_needs_its_placeholders(video_owl, rng):
    cfg, _ = video_owl
    prompts, images, num_images, clips, num_videos = _requests(cfg, rng)
    p = cfg.tokens_per_image
    with pytest.raises(ValueError, match=f"prompt 2: {p} clip placeholders for 2 clip"):
        make_batch(prompts, images, num_images, cfg, clips=clips + clips[:1], num_videos=[0, 0, 2, 2])
    with pytest.raises(ValueError, match=r"prompt 0: negative ids \[-3\] are no placeholder"):
        make_batch([np.asarray([1, -3, 5], np.int32)] + prompts[1:], images, num_images, cfg, clips=clips,
                   num_videos=num_videos)
    with pytest.raises(ValueError, match="clip 1 of shape"):
        make_batch(prompts, images, num_images, cfg, clips=[clips[0], clips[1][:, :8], clips[2]],
                   num_videos=num_videos)


def test_the_image_model_refuses_videos_before_any_work(owl):
    """A request with videos late in a list is refused before the first batch decodes; the image
    model reads a typed <|video|> as text, as it always has."""
    from owl_jax.cli import UserError

    frames = np.zeros((2, 8, 8, 3), np.uint8)
    requests = [{"messages": "hi"}] * 3 + [{"videos": [frames], "messages": "hi"}]
    with pytest.raises(UserError, match="videos need the video model"):
        owl.generate(requests, batch_size=1, max_new_tokens=2, progress=lambda n: pytest.fail("a batch ran"))
    assert isinstance(owl.chat(messages="what is <|video|>?", max_new_tokens=2), str)


@pytest.fixture(scope="module")
def video_owl_dir(tmp_path_factory, video_owl):
    from owl_jax.data.conversation import SYSTEM_PROMPT
    from owl_jax.data.tokenizer import train_tokenizer
    from owl_jax.params_io import save_params

    cfg, params = video_owl
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=384))
    d = tmp_path_factory.mktemp("video_owl")
    save_params(str(d), peaked_params(cfg, seed=3), cfg)
    train_tokenizer([SYSTEM_PROMPT, "What happens in the video?", "A square moves left."] * 5, str(d), vocab_size=384)
    write_video(d / "clip.mkv", 9, size=32, container="matroska")
    return d


def test_the_api_takes_video_files_and_frames(video_owl_dir):
    """A video file is read as the release reads it (4 frames at its sampled indices); the same frames
    given as uint8 pixels answer the same. A batch of requests with and without clips answers each as
    alone."""
    import owl_jax
    from owl_jax.data.video import read_clip

    owl = owl_jax.load(str(video_owl_dir))
    path = str(video_owl_dir / "clip.mkv")
    frames = read_clip(path, size=owl.cfg.vision.image_size)
    question = "What happens in the video?"
    by_file = owl.chat(videos=[path], messages=question, max_new_tokens=5)
    assert by_file == owl.chat(videos=frames, messages=question, max_new_tokens=5)
    requests = [{"messages": question}, {"videos": path, "messages": question},
                {"videos": [frames[:2], frames], "messages": question}]
    answers = owl.generate(requests, batch_size=4, max_new_tokens=5)
    assert answers[1] == by_file
    assert answers == [owl.chat(messages=r["messages"], videos=r.get("videos"), max_new_tokens=5) for r in requests]
    streamed = "".join(owl.chat_stream(videos=path, messages=question, max_new_tokens=5, chunk=2))
    assert streamed == by_file


def test_the_command_line_takes_videos(video_owl_dir, owl_dir, capsys):
    from owl_jax import generate as generate_cli

    args = ["--checkpoint", str(video_owl_dir), "--video", str(video_owl_dir / "clip.mkv"),
            "--prompt", "What happens in the video?", "--max_new_tokens", "5"]
    assert generate_cli.main(args) == 0
    import owl_jax

    owl = owl_jax.load(str(video_owl_dir))
    want = owl.chat(videos=[str(video_owl_dir / "clip.mkv")], messages="What happens in the video?", max_new_tokens=5)
    assert capsys.readouterr().out.strip() == f"AI: {want}".strip()
    (video_owl_dir / "junk.mp4").write_bytes(b"junk" * 50)
    bad = [("--video", str(video_owl_dir / "junk.mp4"), "junk.mp4: "),
           ("--video", str(video_owl_dir / "gone.mp4"), "gone.mp4: no such file")]
    for flag, value, message in bad:
        assert generate_cli.main(args[:2] + [flag, value] + args[4:]) == 2
        assert message in capsys.readouterr().err
    # The image model has no clips to read
    assert generate_cli.main(["--checkpoint", owl_dir] + args[2:]) == 2
    assert "--video needs the video model" in capsys.readouterr().err


def test_without_pyav_a_video_is_refused_naming_the_extra(video_owl_dir, monkeypatch):
    import builtins

    from owl_jax.cli import UserError
    from owl_jax.inference.media import load_clip

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (
        (_ for _ in ()).throw(ImportError("no av")) if name == "av" else real_import(name, *a, **k)))
    with pytest.raises(UserError, match=r"reading videos needs PyAV: pip install 'owl_jax\[video\]'"):
        load_clip(str(video_owl_dir / "clip.mkv"), 56)
