"""The released mPLUG-Owl conversation template, in one place.

Training text and generation prompts are both built here so that they agree byte for byte::

    {SYSTEM_PROMPT}
    Human: <image>
    Human: {question}
    AI: {answer}
    Human: {next question}
    AI: {next answer}

SYSTEM_PROMPT is the release's one line ("The following is a conversation between a curious human
and AI assistant. ..."). Several images give several ``Human: <image>`` lines (all before the first
question). A prompt for generation ends with ``"AI: "``; the model continues with the answer and
stops at EOS.
"""
from __future__ import annotations

import re
from typing import Sequence

SYSTEM_PROMPT = (
    "The following is a conversation between a curious human and AI assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_TAG = "<image>"
VIDEO_TAG = "<|video|>"  # the release's video model: one clip's frames
HUMAN_PREFIX = "Human: "
AI_PREFIX = "AI: "
# The delimiters the released tokeniser splits on (pipeline/data_utils/xgpt3_dataset.py).
HUMAN_DELIM = "\nHuman: "
AI_DELIM = "AI: "

Turn = tuple[str, str | None]  # (question, answer); answer None = the turn to generate


def build_conversation(num_images: int, turns: Sequence[Turn], system_prompt: str = SYSTEM_PROMPT,
                       num_videos: int = 0) -> str:
    """The conversation text for `num_images` images and `num_videos` clips (the video model's; tags
    first, images before clips) and (question, answer) turns.

    Every turn but the last must have an answer. If the last answer is None the text ends with
    ``"AI: "``: a prompt for generation. ``num_images`` may be 0 (text-only).
    """
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    lines = [system_prompt]
    lines += [HUMAN_PREFIX + IMAGE_TAG] * num_images + [HUMAN_PREFIX + VIDEO_TAG] * num_videos
    text = "\n".join(lines)
    for i, (question, answer) in enumerate(turns):
        if answer is None and i != len(turns) - 1:
            raise ValueError("only the last turn may lack an answer")
        text += "\n" + HUMAN_PREFIX + question + "\n" + AI_PREFIX + (answer if answer is not None else "")
    return text


def build_prompt(num_images: int, turns: Sequence[Turn], question: str | None = None,
                 system_prompt: str = SYSTEM_PROMPT, num_videos: int = 0) -> str:
    """A generation prompt: earlier (question, answer) `turns`, then `question`, ending in ``"AI: "``.

    ``build_prompt(1, [], "What colour is the circle?")`` is the single-turn prompt.
    """
    all_turns: list[Turn] = list(turns)
    if question is not None:
        all_turns.append((question, None))
    elif not all_turns or all_turns[-1][1] is not None:
        raise ValueError("give `question`, or end `turns` with an unanswered turn")
    return build_conversation(num_images, all_turns, system_prompt, num_videos)


def caption_conversation(caption: str, num_images: int = 1) -> str:
    """Stage-1 image-caption pair as a one-turn conversation: the images, then the AI's caption.

    There is no human question; the released pretraining format is the caption as the AI answer::

        <system>\\nHuman: <image>\\nAI: {caption}
    """
    lines = [SYSTEM_PROMPT] + [HUMAN_PREFIX + IMAGE_TAG] * num_images
    return "\n".join(lines) + "\n" + AI_PREFIX + caption


def drop_images(text: str, videos: bool = False) -> str:
    """The conversation without its ``Human: <image>`` lines (and, for the video model, whose tags
    they are, its ``Human: <|video|>`` lines): a text-only conversation."""
    text = text.replace("\n" + HUMAN_PREFIX + IMAGE_TAG, "")
    return text.replace("\n" + HUMAN_PREFIX + VIDEO_TAG, "") if videos else text


def count_image_tags(text: str) -> int:
    return text.count(IMAGE_TAG)


def count_video_tags(text: str) -> int:
    return text.count(VIDEO_TAG)


_TURN_RE = re.compile(r"\nHuman: |\nAI: ")


def parse_turns(text: str) -> tuple[int, list[Turn]]:
    """Inverse of `build_conversation` for texts in the template: (num_images, turns).

    Tolerant: anything that is not an image line or a question/answer pair is ignored.
    """
    parts = _TURN_RE.split(text)
    kinds = [m.group(0) for m in _TURN_RE.finditer(text)]
    num_images = 0
    turns: list[Turn] = []
    question = None
    for kind, part in zip(kinds, parts[1:]):
        if kind == "\nHuman: ":
            if part == IMAGE_TAG:
                num_images += 1
            else:
                question = part
        elif question is not None:
            turns.append((question, part))
            question = None
    if question is not None:
        turns.append((question, None))
    return num_images, turns
