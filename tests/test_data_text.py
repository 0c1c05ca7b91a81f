"""Token layout and label masks (docs/design.md, 1.5 and 2.1) on hand-written released-format samples."""
import ast
import os
import re

import numpy as np
import pytest

from owl_jax.data import conversation as conv
from owl_jax.data.text import encode_conversation, encode_prompt, pad_to, split_chunks
from owl_jax.data.tokenizer import load_tokenizer, train_tokenizer

from conftest import CharTokenizer

SYS = conv.SYSTEM_PROMPT
P = -1  # placeholder id


def t(s):
    return [ord(c) + 3 for c in s]


def layout(*segments):
    """segments: (ids, label) pairs -> (ids, loss) arrays."""
    ids, loss = [], []
    for seg, label in segments:
        ids += seg
        loss += [label] * len(seg)
    return np.array(ids, np.int32), np.array(loss, np.int32)


def check(text, expected, max_len=10_000, k=3):
    enc = encode_conversation(text, CharTokenizer(), max_len=max_len, image_token_count=k)
    ids, loss = expected
    np.testing.assert_array_equal(enc.ids, ids)
    np.testing.assert_array_equal(enc.loss_mask, loss)
    return enc


def test_single_image():
    text = SYS + "\nHuman: <image>\nHuman: What colour is it?\nAI: red"
    enc = check(text, layout(
        ([1], 0), (t(SYS), 0), (t("\nHuman: "), 0), ([P] * 3, 0), (t("\nHuman: "), 0),
        (t("What colour is it?\n"), 0), (t("AI: "), 0), (t("red") + [2], 1)))
    assert enc.num_images == 1 and enc.num_image_tags == 1 and not enc.truncated
    assert enc.num_loss_tokens == 4


def test_two_images():
    text = SYS + "\nHuman: <image>\nHuman: <image>\nHuman: Same?\nAI: no"
    enc = check(text, layout(
        ([1], 0), (t(SYS), 0), (t("\nHuman: "), 0), ([P] * 3, 0), (t("\nHuman: "), 0), ([P] * 3, 0),
        (t("\nHuman: "), 0), (t("Same?\n"), 0), (t("AI: "), 0), (t("no") + [2], 1)))
    assert enc.num_images == 2


def test_multi_turn():
    text = SYS + "\nHuman: <image>\nHuman: Q1\nAI: A1\nHuman: Q2\nAI: A2"
    check(text, layout(
        ([1], 0), (t(SYS), 0), (t("\nHuman: "), 0), ([P] * 3, 0), (t("\nHuman: "), 0), (t("Q1\n"), 0),
        (t("AI: "), 0), (t("A1") + [2], 1), (t("\nHuman: "), 0), (t("Q2\n"), 0), (t("AI: "), 0),
        (t("A2") + [2], 1)))


def test_text_only():
    text = SYS + "\nHuman: What is 2 plus 3?\nAI: 5"
    enc = check(text, layout(
        ([1], 0), (t(SYS), 0), (t("\nHuman: "), 0), (t("What is 2 plus 3?\n"), 0), (t("AI: "), 0),
        (t("5") + [2], 1)))
    assert enc.num_images == 0


def test_literal_ids():
    """Fully literal: system 'S', one image of 2 placeholders, no question, answer 'a'."""
    text = "S\nHuman: <image>\nAI: a"
    # chunks: "S", "\nHuman: ", "<image>", "\n", "AI: ", "a" ("\n" before "AI: " is its own chunk)
    assert split_chunks(text) == ["S", "\nHuman: ", "<image>", "\n", "AI: ", "a"]
    enc = encode_conversation(text, CharTokenizer(), max_len=100, image_token_count=2)
    #                  BOS  S   \n  H   u    m    a    n    :   ' '  img img  \n  A   I   :   ' '  a   EOS
    assert enc.ids.tolist() == [1, 86, 13, 75, 120, 112, 100, 113, 61, 35, -1, -1, 13, 68, 76, 61, 35, 100, 2]
    assert enc.loss_mask.tolist() == [0] * 17 + [1, 1]


def test_truncated_answer_has_no_loss_tokens():
    text = SYS + "\nHuman: <image>\nHuman: What colour is it?\nAI: red"
    prefix = 1 + len(SYS) + 8 + 3 + 8 + len("What colour is it?\n") + 4
    enc = encode_conversation(text, CharTokenizer(), max_len=prefix, image_token_count=3)
    assert enc.truncated and enc.num_loss_tokens == 0 and len(enc.ids) == prefix
    # Cut inside the answer: the kept answer tokens count, the EOS is gone.
    enc = encode_conversation(text, CharTokenizer(), max_len=prefix + 2, image_token_count=3)
    assert enc.truncated and enc.loss_mask.tolist()[-2:] == [1, 1] and 2 not in enc.ids.tolist()
    # Exactly enough room: not truncated, EOS kept.
    enc = encode_conversation(text, CharTokenizer(), max_len=prefix + 4, image_token_count=3)
    assert not enc.truncated and enc.ids[-1] == 2
    padded = pad_to(enc, prefix + 10)
    assert padded["attention_mask"].sum() == prefix + 4 and padded["input_ids"][-1] == 0


def test_image_that_does_not_fit_is_dropped_with_the_rest():
    text = SYS + "\nHuman: <image>\nHuman: <image>\nHuman: Same?\nAI: no"
    first = 1 + len(SYS) + 8 + 3 + 8
    enc = encode_conversation(text, CharTokenizer(), max_len=first + 2, image_token_count=3)
    assert enc.num_images == 1 and enc.num_image_tags == 2 and enc.truncated
    assert enc.ids.tolist().count(P) == 3 and len(enc.ids) == first


def test_conversation_template_round_trip():
    text = conv.build_conversation(2, [("Q1", "A1"), ("Q2", "A2")])
    assert text == SYS + "\nHuman: <image>\nHuman: <image>\nHuman: Q1\nAI: A1\nHuman: Q2\nAI: A2"
    assert conv.parse_turns(text) == (2, [("Q1", "A1"), ("Q2", "A2")])
    prompt = conv.build_prompt(1, [("Q1", "A1")], "Q2")
    assert prompt.endswith("\nHuman: Q2\nAI: ") and prompt.count("<image>") == 1
    assert conv.caption_conversation("A cat.") == SYS + "\nHuman: <image>\nAI: A cat."
    # A generation prompt tokenises like the training text up to the answer.
    ids = encode_prompt(prompt, CharTokenizer(), image_token_count=3, tokenization="training")
    train = encode_conversation(conv.build_conversation(1, [("Q1", "A1"), ("Q2", "A2")]), CharTokenizer(), 10_000, 3)
    assert ids.tolist() == train.ids.tolist()[: len(ids)] and 2 not in ids.tolist()[-3:]


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    texts = [conv.build_conversation(1, [(f"What colour is the {s}?", c)]) for s in ("circle", "star", "square")
             for c in ("red", "blue", "green")] * 20 + ["What is 12 plus 30? 42", "Spell KEPLO backwards. OLPEK"] * 20
    out = str(tmp_path_factory.mktemp("tok"))
    train_tokenizer(texts, out, vocab_size=400)
    return load_tokenizer(out)


def test_tokenizer_llama_ids(sp_tokenizer, tmp_path):
    tok = sp_tokenizer
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert len(tok) <= 400
    ids = tok("What colour is the circle? é", add_special_tokens=False)["input_ids"]
    assert 0 not in ids  # byte fallback: no unk even for unseen characters
    assert tok.decode(ids) == "What colour is the circle? é"
    assert tok("12", add_special_tokens=False)["input_ids"][-2:] != tok("1", add_special_tokens=False)["input_ids"]
    # a bare .model file under another name loads too
    import shutil

    src = os.path.join(os.path.dirname(tok.name_or_path) if os.path.isfile(tok.name_or_path) else tok.name_or_path,
                       "tokenizer.model")
    shutil.copy(src, tmp_path / "other.model")
    tok2 = load_tokenizer(str(tmp_path / "other.model"))
    assert tok2("red circle", add_special_tokens=False)["input_ids"] == \
        tok("red circle", add_special_tokens=False)["input_ids"]


def test_dropped_pieces_never_form_and_a_retrained_tokenizer_replaces_the_old_files(tmp_path):
    """`drop_pieces`: no token of the vocabulary matches it, so a word of capitals is one token a
    letter, and ids and pieces agree between SentencePiece and the transformers files. Training again
    into the same directory leaves none of the first tokenizer's files behind to be read instead."""
    from owl_jax.data.tokenizer import encode_text

    texts = [f"Spell the word {w} backwards. {w[::-1]}" for w in ("KEPLO", "ZANTH", "QUIRB", "KEPLO")] * 30
    out = str(tmp_path / "tok")
    train_tokenizer(texts, out, vocab_size=400)
    merged = load_tokenizer(out)
    assert any(len(p.strip("\u2581")) > 1 and p.strip("\u2581").isupper() for p in merged.get_vocab())
    train_tokenizer(texts, out, vocab_size=400, drop_pieces=r"[A-Z]{2}|\u2581[A-Z]")
    tok = load_tokenizer(out)
    assert not [p for p in tok.get_vocab() if re.search(r"[A-Z]{2}|\u2581[A-Z]", p) and not p.startswith("<")]
    ids = encode_text(tok, "Spell the word KEPLO backwards.")
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[pieces.index("\u2581word") + 1:][:7] == ["\u2581", "K", "E", "P", "L", "O", "\u2581backwards"], pieces
    assert tok.decode(ids) == "Spell the word KEPLO backwards."


RELEASE = os.environ.get("OWL_RELEASE_SRC", "/work/owl_release_src/mPLUG-Owl")


def _release_extract():
    """The released `_extract_text_token_from_conversation`, compiled from the release source."""
    path = os.path.join(RELEASE, "pipeline/data_utils/xgpt3_dataset.py")
    assert os.path.exists(path), f"no released mPLUG-Owl source at {RELEASE} (set OWL_RELEASE_SRC)"
    torch = pytest.importorskip("torch")
    tree = ast.parse(open(path).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MultiModalDataset")
    fn = next(
        n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "_extract_text_token_from_conversation"
    )
    ns = {"re": re, "torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), ns)
    return ns["_extract_text_token_from_conversation"]


@pytest.mark.real_data
@pytest.mark.filterwarnings("ignore::UserWarning")  # the release's torch.tensor(tensor)
def test_matches_released_tokenisation(sp_tokenizer):
    """Untruncated samples: ids and labels equal the release's (its labels = [0] + prompt_mask)."""
    extract = _release_extract()

    class Self:
        tokenizer = sp_tokenizer
        media_tokens = {"<image>": -1}
        media_lengths = {"<image>": 65}

    samples = [
        conv.build_conversation(1, [("What colour is the circle?", "red")]),
        conv.build_conversation(2, [("Are they the same colour?", "yes")]),
        conv.build_conversation(1, [("What shape is it?", "star"), ("How many?", "3"), ("Where?", "left")]),
        conv.build_conversation(0, [("What is 12 plus 30?", "42"), ("Spell KEPLO backwards.", "OLPEK")]),
        conv.caption_conversation("A red circle on the left."),
    ]
    max_length = 512
    for text in samples:
        ref = extract(Self(), {"completion": text}, max_length, 0)
        n = int(ref["seq_length"])
        ours = encode_conversation(text, sp_tokenizer, max_len=max_length)
        assert ours.ids.tolist() == ref["input_ids"][:n].tolist(), text
        assert ours.loss_mask.tolist() == [0] + ref["prompt_mask"][: n - 1].tolist(), text


def test_prompt_tokenised_as_the_release_processor(sp_tokenizer):
    """Generation prompts: split on <image> only, each piece tokenised whole (the release's
    `_tokenize_prompt`); training chunks also split at "\nHuman: " and "AI: ", which gives other ids."""
    prompt = conv.build_prompt(1, [], "What colour is the circle?")
    head, tail = prompt.split("<image>")
    tok = sp_tokenizer.release_encode  # SentencePiece on each piece as it is
    ids = encode_prompt(prompt, sp_tokenizer, image_token_count=5)
    assert ids.tolist() == [1] + tok(head) + [-1] * 5 + tok(tail)
    assert ids.tolist() != encode_prompt(prompt, sp_tokenizer, image_token_count=5, tokenization="training").tolist()
    text_only = conv.build_prompt(0, [], "Hi")
    assert encode_prompt(text_only, sp_tokenizer).tolist() == [1] + tok(text_only)
    with pytest.raises(ValueError, match="expected one of"):
        encode_prompt(prompt, sp_tokenizer, tokenization="chunks")


@pytest.mark.real_data
def test_prompt_matches_released_processor(sp_tokenizer):
    """ids equal the released source's `_tokenize_prompt` with BOS."""
    path = os.path.join(RELEASE, "mplug_owl/processing_mplug_owl.py")
    assert os.path.exists(path), f"no released mPLUG-Owl source at {RELEASE} (set OWL_RELEASE_SRC)"
    tree = ast.parse(open(path).read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_tokenize_prompt")
    ns = {"re": re}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), ns)

    class SlowTokenizer:  # transformers 4.28's LlamaTokenizer, the release's: SentencePiece on the text as is
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": sp_tokenizer.release_encode.__call__(text)}

    prompts = [conv.build_prompt(n, [("Hi", "Hello.")], q)
               for n, q in ((1, "What colour is the circle?"), (2, "Are they the same?"), (0, "Spell KEPLO."))]
    prompts.append("Human: <image> What is it?\nAI: ")  # a piece that starts with a space
    for prompt in prompts:
        ref = ns["_tokenize_prompt"](prompt, SlowTokenizer(), add_BOS=True, media_info={"<image>": 65})
        assert encode_prompt(prompt, sp_tokenizer).tolist() == ref, prompt


def test_text_encodes_as_the_release_tokenizer(sp_tokenizer):
    """transformers 4.28's slow LlamaTokenizer (the release's) ran SentencePiece on each piece as it
    is; transformers 5's drops a "▁" from a piece that starts with a space."""
    import pickle

    import sentencepiece as spm

    from owl_jax.data.tokenizer import encode_text

    sp = spm.SentencePieceProcessor(model_file=sp_tokenizer.release_encode.model_file)
    for text in (" leading", "  two", " ", "red circle", "AI: ", "end. ", "What? é"):
        assert encode_text(sp_tokenizer, text) == sp.encode(text), text
    assert sp.encode(" leading") != sp_tokenizer(" leading", add_special_tokens=False)["input_ids"]
    assert encode_text(sp_tokenizer, "x </s> y") == sp.encode("x ") + [2] + sp.encode(" y")
    answer = encode_conversation(conv.build_conversation(0, [("Q?", " red")]), sp_tokenizer, 512)  # "AI:  red"
    assert answer.ids[answer.loss_mask == 1].tolist() == sp.encode(" red") + [2]
    again = pickle.loads(pickle.dumps(sp_tokenizer.release_encode))  # grain workers get a copy
    assert again(" leading") == sp.encode(" leading")


def test_tokens_added_to_the_vocabulary_encode_whole(sp_tokenizer, tmp_path):
    """A token added to a saved tokenizer (its tokenizer.model unchanged) is one id in the training
    text, as the release's slow tokenizer split it out, with the whitespace around it dropped;
    SentencePiece alone would spell it out in pieces."""
    import pickle
    import shutil

    import sentencepiece as spm

    from owl_jax.data.tokenizer import encode_text

    out = str(tmp_path / "tok")
    shutil.copytree(sp_tokenizer.name_or_path, out)
    tok = load_tokenizer(out)
    tok.add_tokens(["<red-star-left>", "<red-star>"])
    tok.save_pretrained(out)
    tok = load_tokenizer(out)
    word, prefix = tok.convert_tokens_to_ids(["<red-star-left>", "<red-star>"])
    assert word >= 400 and prefix == word + 1
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    assert len(sp.encode("<red-star-left>")) > 1
    assert encode_text(tok, "<red-star-left><red-star>. red") == [word, prefix] + sp.encode(". red")
    assert encode_text(tok, "a <red-star-left> b") == sp.encode("a") + [word] + sp.encode("b")
    assert encode_text(tok, "x </s> y") == sp.encode("x ") + [2] + sp.encode(" y")  # specials keep theirs
    text = conv.build_conversation(1, [("What colour is the star?", "star red")]).replace("<image>", "<red-star-left>.")
    assert word in encode_conversation(text, tok, 512).ids.tolist()
    again = pickle.loads(pickle.dumps(tok.release_encode))  # grain workers get a copy
    assert again("<red-star-left>") == [word]
