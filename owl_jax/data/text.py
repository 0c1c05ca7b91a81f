"""Tokenisation of conversations: token layout and label (loss) masks.

Matches the released `MultiModalDataset._extract_text_token_from_conversation`:

* The text is split on ``<image>`` (and ``<|video|>``), ``"AI: "`` and ``"\\nHuman: "`` (the delimiters are kept as
  chunks) and every non-empty chunk is tokenised on its own (`encode_text`: SentencePiece as the
  release's tokenizer ran it), so each chunk gets the dummy-prefix space exactly as in the release.
* BOS (1) starts the sample; each ``<image>`` becomes `image_token_count` placeholders of id -1; for
  the video model (`video_tags`) each ``<|video|>`` as many of id -2 (the release has no video
  training code; its processor encodes prompts so). For the image model it is text.
* A chunk that directly follows an ``"AI: "`` chunk is an answer: its tokens plus EOS (2) have
  loss_mask 1. Everything else (system prompt, human turns, the ``"AI: "`` prefix, placeholders)
  has loss_mask 0.

The loss mask marks the token *itself* as a target: the training loss uses logits[t] to predict
ids[t+1] with weight loss_mask[t+1] (the release's ``prompt_mask = label_chunk[1:]``).

Truncation to `max_len` tokens (BOS included) is left to right: a text chunk is cut at the limit;
an image whose placeholders do not all fit is dropped together with everything after it (so the
sample keeps only the images whose tags survived; clips alike); an answer cut by the limit keeps the tokens that
fit and gets no EOS. (Deliberate deviation: the release appends EOS to a truncated answer, which
teaches the model to stop mid-sentence.) A sample may end with no loss token at all; it is
reported (``num_loss_tokens == 0``), never divided by.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from owl_jax.batch import BOS_ID, EOS_ID, IMAGE_PLACEHOLDER_ID, PAD_ID, VIDEO_PLACEHOLDER_ID
from owl_jax.data.conversation import AI_DELIM, HUMAN_DELIM, IMAGE_TAG, VIDEO_TAG
from owl_jax.data.tokenizer import encode_text

DEFAULT_IMAGE_TOKEN_COUNT = 65  # 64 queries + vit_eos

def _placeholders(video_tags: bool) -> dict[str, int]:
    """Each media tag's placeholder id: `<|video|>` only for the video model (else it is text)."""
    return {IMAGE_TAG: IMAGE_PLACEHOLDER_ID} | ({VIDEO_TAG: VIDEO_PLACEHOLDER_ID} if video_tags else {})


def _split_re(delimiters: list[str], video_tags: bool) -> re.Pattern:
    """Splits on the media tags and `delimiters`, keeping them."""
    return re.compile("(" + "|".join(map(re.escape, list(_placeholders(video_tags)) + delimiters)) + ")")


@dataclasses.dataclass
class Encoded:
    ids: np.ndarray  # int32[n], n <= max_len
    loss_mask: np.ndarray  # int32[n]
    num_images: int  # images whose placeholders were kept (a prefix of the sample's images)
    num_image_tags: int  # <image> tags in the text
    truncated: bool  # the max_len limit cut something off
    num_videos: int = 0  # clips whose placeholders were kept (a prefix of the sample's clips)
    num_video_tags: int = 0  # <|video|> tags in the text

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def split_chunks(text: str, video_tags: bool = False) -> list[str]:
    """The release's chunking: delimiters kept, empty chunks dropped."""
    return [c for c in _split_re([AI_DELIM, HUMAN_DELIM], video_tags).split(text) if c]


def encode_conversation(text: str, tokenizer, max_len: int, image_token_count: int = DEFAULT_IMAGE_TOKEN_COUNT,
                        add_bos: bool = True, answer_eos: bool = True, video_tags: bool = False) -> Encoded:
    """Token ids and loss mask of one conversation (see module docstring); `video_tags`: the video
    model's, whose `<|video|>` tags are clips."""
    ids: list[int] = [BOS_ID] if add_bos else []
    loss: list[int] = [0] * len(ids)
    chunks = split_chunks(text, video_tags)
    placeholders = _placeholders(video_tags)
    num_tags = sum(c == IMAGE_TAG for c in chunks)
    kept = {IMAGE_TAG: 0, VIDEO_TAG: 0}
    truncated = len(ids) > max_len
    ids, loss = ids[:max_len], loss[:max_len]
    prev = None
    for chunk in chunks:
        if truncated:
            break
        room = max_len - len(ids)
        if chunk in placeholders:
            if image_token_count > room:
                truncated = True
                break
            ids += [placeholders[chunk]] * image_token_count
            loss += [0] * image_token_count
            kept[chunk] += 1
        else:
            is_answer = prev == AI_DELIM
            toks = encode_text(tokenizer, chunk)
            if is_answer and answer_eos:
                toks.append(EOS_ID)
            if len(toks) > room:
                toks = toks[:room]  # a cut answer loses its EOS (it was the last token)
                truncated = True
            ids += toks
            loss += [1 if is_answer else 0] * len(toks)
        prev = chunk
    return Encoded(np.asarray(ids, np.int32), np.asarray(loss, np.int32), kept[IMAGE_TAG], num_tags, truncated,
                   kept[VIDEO_TAG], sum(c == VIDEO_TAG for c in chunks))


PROMPT_TOKENIZATIONS = ("release", "training")


def encode_prompt(text: str, tokenizer, image_token_count: int = DEFAULT_IMAGE_TOKEN_COUNT,
                  tokenization: str = "release", video_tags: bool = False) -> np.ndarray:
    """Token ids of a generation prompt (ending in ``"AI: "``).

    "release": as the released processor tokenises prompts (``processing_mplug_owl._tokenize_prompt``):
    the text is split on ``<image>`` (and ``<|video|>``) only and each piece tokenised whole, so ``"\nAI: "`` gets no
    dummy-prefix space of its own. The release trained on "training" chunks and generates from these;
    its weights answer as in the release only from these ids. "training": chunked exactly as in
    training (`encode_conversation`), for a model evaluated in its own training format.

    Returns int32[n] starting with BOS, with -1 placeholders per image (-2 per clip) and no EOS.
    """
    if tokenization == "training":
        return encode_conversation(text, tokenizer, max_len=1 << 30, image_token_count=image_token_count,
                                   video_tags=video_tags).ids
    if tokenization != "release":
        raise ValueError(f"prompt tokenization {tokenization!r}: expected one of {PROMPT_TOKENIZATIONS}")
    ids = [BOS_ID]
    placeholders = _placeholders(video_tags)
    for piece in _split_re([], video_tags).split(text):
        if piece in placeholders:
            ids += [placeholders[piece]] * image_token_count
        elif piece:
            ids += encode_text(tokenizer, piece)
    return np.asarray(ids, np.int32)


def pad_to(enc: Encoded, max_len: int) -> dict[str, np.ndarray]:
    """Right-pads one encoded sample to `max_len`: input_ids (pad 0), attention_mask, loss_mask."""
    n = len(enc.ids)
    input_ids = np.full((max_len,), PAD_ID, np.int32)
    input_ids[:n] = enc.ids
    attention = np.zeros((max_len,), np.int32)
    attention[:n] = 1
    loss = np.zeros((max_len,), np.int32)
    loss[:n] = enc.loss_mask
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss}
