"""Tokenizers: load a LLaMA-compatible SentencePiece tokenizer, or train a small one.

Ids follow LLaMA: unk 0, bos 1, eos 2, and pad = 0 (the unk id; padding is masked anyway).
Nothing here downloads: `path` is a local directory or ``.model`` file.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 0

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork grain workers


def load_tokenizer(path: str):
    """A transformers `LlamaTokenizer` (bos 1, eos 2, unk 0, pad 0) from a local path.

    `path` is a directory holding ``tokenizer.json`` and/or ``tokenizer.model`` (as written by
    `train_tokenizer` or shipped with LLaMA checkpoints), or a SentencePiece ``.model`` file.
    """
    from transformers import LlamaTokenizer

    path = os.fspath(path)
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
        raise ValueError(
            f"tokenizer at {path!r} has unk/bos/eos/pad ids "
            f"{(tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)}, expected (0, 1, 2, 0)"
        )
    return tok


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 1024) -> str:
    """Train a byte-fallback BPE SentencePiece model on `texts` (LLaMA ids) into `out_dir`.

    Writes ``tokenizer.model`` plus the transformers files (``tokenizer.json``,
    ``tokenizer_config.json``) so `load_tokenizer(out_dir)` is fast. The vocabulary holds at most
    `vocab_size` pieces (fewer if the text is too small to fill it); digits are split one per
    token. Deterministic for the same texts (single-threaded training).
    """
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
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
    tok = load_tokenizer(prefix + ".model")
    tok.save_pretrained(out_dir)
    return out_dir
