"""Tokenizers: load a LLaMA-compatible SentencePiece tokenizer, or train a small one.

Ids follow LLaMA: unk 0, bos 1, eos 2, and pad = 0 (the unk id; padding is masked anyway).
Nothing here downloads: `path` is a local directory or ``.model`` file.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Iterable

from absl import logging

from owl_jax.batch import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from owl_jax.cli import UserError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork grain workers


def load_tokenizer(path: str):
    """A transformers `LlamaTokenizer` (bos 1, eos 2, unk 0, pad 0) from a local path.

    `path` is a directory holding ``tokenizer.json`` and/or ``tokenizer.model`` (as written by
    `train_tokenizer` or shipped with LLaMA checkpoints), or a SentencePiece ``.model`` file.
    """
    from transformers import LlamaTokenizer

    path = os.fspath(path)
    files = ("tokenizer.model", "tokenizer.json")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in files):
        raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.model and/or tokenizer.json there")
    model_file = path if os.path.isfile(path) else os.path.join(path, "tokenizer.model")
    if os.path.isfile(model_file):
        _check_sentencepiece(model_file)
    if os.path.isfile(path):
        if os.path.basename(path) == "tokenizer.model":
            tok = LlamaTokenizer.from_pretrained(os.path.dirname(path) or ".", local_files_only=True)
        else:  # any other file name: copy it under the name transformers looks for
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copy(path, os.path.join(tmp, "tokenizer.model"))
                tok = LlamaTokenizer.from_pretrained(tmp, local_files_only=True)
    elif os.path.isdir(path):
        tok = LlamaTokenizer.from_pretrained(path, local_files_only=True)
    else:
        raise FileNotFoundError(f"no tokenizer at {path!r}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token
    if (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) != (UNK_ID, BOS_ID, EOS_ID, PAD_ID):
        raise UserError(
            f"tokenizer at {path!r} has unk/bos/eos/pad ids "
            f"{(tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)}, expected (0, 1, 2, 0)"
        )
    if os.path.isfile(model_file):
        specials = {tok.unk_token: UNK_ID, tok.bos_token: BOS_ID, tok.eos_token: EOS_ID}
        added = {t: i for t, i in tok.get_added_vocab().items() if t not in specials}
        tok.release_encode = ReleaseTextEncoder(model_file, specials, added)
    return tok


def _check_sentencepiece(model_file: str) -> None:
    """Refuses a file SentencePiece cannot parse (truncated, or not a tokenizer at all): transformers
    would fall back to reading it as a tiktoken file and ask for that package instead."""
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=model_file)
    except (RuntimeError, OSError):
        raise UserError(f"{model_file} is not a SentencePiece model (SentencePiece cannot parse it): "
                        "expected a LLaMA tokenizer.model") from None


class ReleaseTextEncoder:
    """Text -> ids as the release's tokenizer made them (transformers 4.28's slow `LlamaTokenizer`):
    special-token strings and tokens added to the vocabulary (`added`, e.g. by `add_tokens`) split
    out whole, every other piece through SentencePiece as it is; the whitespace next to an added
    token is dropped, as that tokenizer dropped it around tokens added as plain strings.
    transformers 5's LlamaTokenizer takes a leading space for SentencePiece's dummy prefix, so a
    chunk " leading" (a double space after "AI:" in the data) loses a "▁" token there."""

    def __init__(self, model_file: str, specials: dict[str, int], added: dict[str, int] | None = None):
        import sentencepiece as spm

        self.model_file = model_file
        self._sp = spm.SentencePieceProcessor(model_file=model_file)
        self._specials, self._added = specials, dict(added or {})
        self._whole = specials | self._added
        longest_first = sorted(self._whole, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    def __call__(self, text: str) -> list[int]:
        pieces = self._split.split(text)
        for i in range(1, len(pieces), 2):  # the odd pieces are the matches
            if pieces[i] in self._added:
                pieces[i - 1], pieces[i + 1] = pieces[i - 1].rstrip(), pieces[i + 1].lstrip()
        ids = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(self._whole[piece])
            elif piece:
                ids += self._sp.encode(piece)
        return ids

    def __reduce__(self):  # pickled into grain workers: the model file, not the C++ object
        return ReleaseTextEncoder, (self.model_file, self._specials, self._added)


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of `text` with no BOS/EOS added: as the release's tokenizer where `load_tokenizer` found
    the SentencePiece model, else the tokenizer's own (e.g. a tokenizer.json alone)."""
    release = getattr(tokenizer, "release_encode", None)
    if release is not None:
        return release(text)
    logging.log_first_n(logging.WARNING, "tokenizer %s has no SentencePiece model at hand (load it with "
                        "load_tokenizer from a dir with tokenizer.model): text pieces that start with a space "
                        "tokenise unlike the release", 1, getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _drop_pieces(model_file: str, pattern: re.Pattern) -> None:
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        model.ParseFromString(f.read())
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    kept = [p for p in model.pieces if p.type != normal or not pattern.search(p.piece)]
    del model.pieces[:]
    model.pieces.extend(kept)
    with open(model_file, "wb") as f:
        f.write(model.SerializeToString())


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 1024, drop_pieces: str = "") -> str:
    """Train a byte-fallback BPE SentencePiece model on `texts` (LLaMA ids) into `out_dir`.

    Writes ``tokenizer.model`` plus the transformers files (``tokenizer.json``,
    ``tokenizer_config.json``) so `load_tokenizer(out_dir)` is fast. The vocabulary holds at most
    `vocab_size` pieces (fewer if the text is too small to fill it); digits are split one per
    token. Learnt pieces that match the regex `drop_pieces` are removed from the vocabulary, so
    the merges that make them never happen (e.g. every piece holding two capital letters: a word of
    capitals is then one token a letter, and spelling it backwards is reversing tokens).
    SentencePiece's own ``user_defined_symbols`` would do it, but transformers' conversion of such
    a model to tokenizer.json numbers its vocabulary differently from the model.
    Deterministic for the same texts (single-threaded training).
    """
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        # an earlier tokenizer's files would be read instead of the new model's
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        max_sentence_length=1 << 16,
        num_threads=1,
        minloglevel=2,
    )
    os.remove(prefix + ".vocab")
    if drop_pieces:
        _drop_pieces(prefix + ".model", re.compile(drop_pieces))
    tok = load_tokenizer(prefix + ".model")
    tok.save_pretrained(out_dir)
    return out_dir
