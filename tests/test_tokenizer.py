"""Tokenizer tests: official SentencePiece parity and the trained byte-level BPE."""

from __future__ import annotations

import argparse
import json
import re
import sysconfig
from pathlib import Path

import pytest

from internlm2.tokenizer import (
    CHAT_SPECIAL_TOKENS,
    CHAT_TEMPLATE,
    BPETokenizer,
    SentencePieceTokenizer,
    add_cli,
    compression,
    is_cjk,
    load_tokenizer,
    synthetic_chinese,
    train_tokenizer,
)

OFFICIAL = Path(__file__).resolve().parents[1].parent / "shared/data/internlm2_tokenizer.model"
CHAT_ORDER = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>",
              "<|im_end|>", "<|im_start|>"]

# REFERENCE.md section 2.
VECTOR_TEXT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
               "Hello<|im_end|>\n<|im_start|>assistant\n")
VECTOR_IDS = [1, 92543, 9081, 364, 2770, 657, 395, 11100, 17993, 281, 92542, 364, 92543, 1008,
              364, 9843, 92542, 364, 92543, 525, 11353, 364]
VECTOR2_TEXT = "<|im_start|>system name=<|plugin|>\n"
VECTOR2_IDS = [92543, 9081, 963, 310, 92538, 364]

# Texts without special tokens, covering what SentencePiece could get wrong.
PLAIN_TEXTS = [
    "Hello world",
    " Hello  world ",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; they'll arrive at 10.",
    "书生·浦语是上海人工智能实验室发布的大语言模型，支持中文和英文。",
    "混合 text 与中文，数字 2024 年 3 月 15 日。",
    "def f(x):\n    return {'a': [x, x ** 2]}\n\n\nclass A:\n\tpass\n",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇨🇳",
    "rare: ﬁ ᚠ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x01\x7f \u200b\ufeff é ñ",
    "   leading spaces",
    "\t\ttabs\tand\t\t\ttabs",
    "newline runs\n\n\n\n\nand\r\n\r\nCRLF",
    "trailing   ",
    "12345678901234567890 3.14159 -42 1e10 0x1F",
    " ",
    "\n",
    "",
]


@pytest.fixture(scope="module")
def sp_tok() -> SentencePieceTokenizer:
    if not OFFICIAL.is_file():
        pytest.skip(f"official tokenizer not found at {OFFICIAL} (the shared folder beside the repo)")
    return SentencePieceTokenizer(OFFICIAL)


@pytest.fixture(scope="module")
def raw_sp():
    import sentencepiece as spm

    if not OFFICIAL.is_file():
        pytest.skip(f"official tokenizer not found at {OFFICIAL}")
    return spm.SentencePieceProcessor(model_file=str(OFFICIAL))


# ----------------------------------------------------------------------------------------------
# Official SentencePiece tokenizer
# ----------------------------------------------------------------------------------------------

def test_reference_vectors(sp_tok):
    assert sp_tok.encode(VECTOR_TEXT) == VECTOR_IDS
    assert sp_tok.encode(VECTOR2_TEXT, add_bos=False) == VECTOR2_IDS
    assert sp_tok.decode(VECTOR_IDS) == "<s>" + VECTOR_TEXT
    assert sp_tok.decode(VECTOR_IDS, skip_special_tokens=True) == (
        "system\nYou are a helpful assistant.\nuser\nHello\nassistant\n")


def test_official_layout(sp_tok):
    assert sp_tok.vocab_size == len(sp_tok) == 92544
    assert (sp_tok.unk_id, sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (0, 1, 2, 2)
    assert {k: sp_tok.special_tokens[k] for k in CHAT_SPECIAL_TOKENS} == CHAT_SPECIAL_TOKENS
    assert (sp_tok.im_start_id, sp_tok.im_end_id) == (92543, 92542)
    assert (sp_tok.action_start_id, sp_tok.action_end_id) == (92541, 92540)
    assert (sp_tok.plugin_id, sp_tok.interpreter_id) == (92538, 92539)
    assert sp_tok.stop_ids == [2, 92542]
    assert sp_tok.token_to_id("<|im_end|>") == 92542
    assert sp_tok.token_to_id("<s>") == 1
    assert sp_tok.token_to_id("▁world") == 2028
    assert sp_tok.token_to_id("no such piece at all") is None
    assert sp_tok.id_to_token(92543) == "<|im_start|>"
    assert sp_tok.id_to_token(3) == "<0x00>"
    assert sp_tok.id_to_token(92397) == "[UNUSED_TOKEN_0]"
    with pytest.raises(IndexError):
        sp_tok.id_to_token(92544)


def test_hello_world_no_dummy_prefix(sp_tok):
    ids = sp_tok.encode("Hello world", add_bos=False)
    assert sp_tok.pieces(ids) == ["Hello", "▁world"]
    assert sp_tok.encode("Hello world") == [1, *ids]
    assert sp_tok.encode("Hello world", add_eos=True) == [1, *ids, 2]


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_matches_sentencepiece_and_round_trips(sp_tok, raw_sp, text):
    ids = sp_tok.encode(text, add_bos=False)
    assert ids == raw_sp.encode(text)
    assert sp_tok.encode(text) == [1, *ids]
    assert sp_tok.decode(ids) == text
    assert sp_tok.decode([1, *ids], skip_special_tokens=True) == text


def test_digits_at_most_three_per_piece(sp_tok):
    # A property of the vocabulary (no piece has 4+ digits), not a left-to-right chunking:
    # SentencePiece's BPE gives "1234567" -> 123, 45, 67.
    ids = sp_tok.encode("1234567 98765432101", add_bos=False)
    assert sp_tok.pieces(ids)[:3] == ["123", "45", "67"]
    assert all(sum(c.isdigit() for c in sp_tok.decode([i])) <= 3 for i in ids)


def test_leading_space_survives_special_tokens(sp_tok):
    text = "<|im_start|> leading\n  two<|im_end|>   <|im_end|>\t"
    ids = sp_tok.encode(text, add_bos=False)
    assert sp_tok.decode(ids) == text
    assert sp_tok.pieces(ids)[1] == "▁leading"


def test_special_tokens_single_ids_and_allow_special(sp_tok):
    for tok, i in sp_tok.special_tokens.items():
        assert sp_tok.encode(tok, add_bos=False) == [i]
        assert sp_tok.encode(f"a{tok}b", add_bos=False)[1] == i
        plain = sp_tok.encode(tok, add_bos=False, allow_special=False)
        assert not set(plain) & set(sp_tok.special_tokens.values())
        assert sp_tok.decode(plain) == tok
    # The raw model maps the spare piece text onto the chat id; allow_special=False must not.
    assert sp_tok.encode("[UNUSED_TOKEN_146]", add_bos=False) == [92543]
    plain = sp_tok.encode("[UNUSED_TOKEN_146]", add_bos=False, allow_special=False)
    assert 92543 not in plain and sp_tok.decode(plain) == "[UNUSED_TOKEN_146]"


def test_batch_and_tensor_inputs(sp_tok):
    import torch

    texts = [VECTOR_TEXT, "", "x", *PLAIN_TEXTS[:4]]
    assert sp_tok.encode_batch(texts) == [sp_tok.encode(t) for t in texts]
    assert sp_tok.decode(torch.tensor(VECTOR_IDS)) == sp_tok.decode(VECTOR_IDS)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sp_tok.decode([92544])


def test_sp_save_writes_hf_files(sp_tok, tmp_path):
    jinja2 = pytest.importorskip("jinja2")
    out = sp_tok.save(tmp_path / "tok")
    assert (out / "tokenizer.model").read_bytes() == OFFICIAL.read_bytes()
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == (
        "<s>", "</s>", "</s>", "<unk>")
    assert cfg["tokenizer_class"] == "InternLM2Tokenizer"
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert cfg["additional_special_tokens"] == CHAT_ORDER[::-1]
    for tok, i in CHAT_SPECIAL_TOKENS.items():
        assert cfg["added_tokens_decoder"][str(i)]["content"] == tok
        assert cfg["added_tokens_decoder"][str(i)]["special"] is True
    smap = json.loads((out / "special_tokens_map.json").read_text())
    assert smap["eos_token"]["content"] == "</s>"
    assert not list(out.glob("*.tmp"))

    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello"}]
    rendered = jinja2.Template(cfg["chat_template"]).render(
        messages=messages, bos_token=cfg["bos_token"], add_generation_prompt=True)
    assert rendered == "<s>" + VECTOR_TEXT
    assert sp_tok.encode(rendered[len("<s>"):]) == VECTOR_IDS

    again = load_tokenizer(out)
    assert isinstance(again, SentencePieceTokenizer)
    assert again.encode(VECTOR_TEXT) == VECTOR_IDS


def test_sp_save_loads_in_transformers(sp_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = sp_tok.save(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in [VECTOR_TEXT, VECTOR2_TEXT, *PLAIN_TEXTS]:
        assert hf(text)["input_ids"] == sp_tok.encode(text)
    assert hf.decode(VECTOR_IDS) == sp_tok.decode(VECTOR_IDS)
    ids = hf.apply_chat_template([{"role": "user", "content": "Hello"}],
                                 add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids == [1, 92543, 1008, 364, 9843, 92542, 364, 92543, 525, 11353, 364]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tokenizer(tmp_path / "missing")
    bad = tmp_path / "vocab.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match="vocab.txt"):
        load_tokenizer(bad)
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="broken.model"):
        load_tokenizer(broken)
    broken_json = tmp_path / "tokenizer.json"
    broken_json.write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(broken_json)


# ----------------------------------------------------------------------------------------------
# Trained byte-level BPE
# ----------------------------------------------------------------------------------------------

def _corpus() -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    code, size = [], 0
    for p in sorted(lib.glob("*.py")):
        text = p.read_text(encoding="utf-8", errors="replace")
        code.append(text)
        size += len(text)
        if size > 1_200_000:
            break
    zh = synthetic_chinese(12000, seed=1)
    return code + [zh[i : i + 20000] for i in range(0, len(zh), 20000)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> BPETokenizer:
    out = tmp_path_factory.mktemp("bpe")
    return train_tokenizer(_corpus(), 2048, out)


def test_bpe_layout(bpe):
    assert bpe.vocab_size == 2048 and bpe.vocab_size % 128 == 0
    assert (bpe.unk_id, bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2, 2)
    assert [bpe.id_to_token(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [bpe.id_to_token(i) for i in range(2042, 2048)] == CHAT_ORDER
    assert bpe.im_start_id == 2047 and bpe.im_end_id == 2046 and bpe.stop_ids == [2, 2046]
    assert bpe.id_to_token(2041).startswith("[UNUSED_TOKEN_")
    assert bpe.token_to_id("<|plugin|>") == 2042


@pytest.mark.parametrize("text", PLAIN_TEXTS + ["x\u2581y ▁▁", VECTOR_TEXT])
def test_bpe_round_trip(bpe, text):
    assert bpe.decode(bpe.encode(text, add_bos=False)) == text
    assert bpe.decode(bpe.encode(text, add_bos=False, allow_special=False)) == text
    assert bpe.decode(bpe.encode(text), skip_special_tokens=True) == re.sub(
        "|".join(map(re.escape, bpe.special_tokens)), "", text)


def test_bpe_digits_at_most_three(bpe):
    for i in range(bpe.vocab_size):
        assert sum(c.isdigit() for c in bpe.decode([i])) <= 3, bpe.id_to_token(i)
    ids = bpe.encode("x = 1234567890123 + 98765", add_bos=False)
    assert "".join(bpe.decode([i]) for i in ids) == "x = 1234567890123 + 98765"


def test_bpe_single_digits(tmp_path):
    texts = [f"item {i * 7919 % 100000} costs {i * 31 % 997}.{i % 100} units\n" * 3
             for i in range(2000)] + [synthetic_chinese(2000, seed=2)]
    tok = train_tokenizer(texts, 512, tmp_path / "d1", digit_group=1)
    for i in range(tok.vocab_size):
        assert sum(c.isdigit() for c in tok.decode([i])) <= 1, tok.id_to_token(i)
    ids = tok.encode("The code is 48213.", add_bos=False)
    assert [tok.decode([i]) for i in ids][-6:] == ["4", "8", "2", "1", "3", "."]
    again = load_tokenizer(tmp_path / "d1")  # the split is part of the saved tokenizer
    assert again.encode("x 90517 y") == tok.encode("x 90517 y")
    three = train_tokenizer(texts, 512)  # the default keeps groups of up to three
    assert any(sum(c.isdigit() for c in three.decode([i])) >= 2 for i in range(512))
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="digit_group"):
            train_tokenizer(texts, 512, digit_group=bad)


def test_bpe_special_tokens(bpe):
    ids = bpe.encode(VECTOR_TEXT)
    assert ids[:2] == [1, bpe.im_start_id] and ids.count(bpe.im_end_id) == 2
    for tok, i in bpe.special_tokens.items():
        assert bpe.encode(f" {tok} ", add_bos=False)[1] == i
        plain = bpe.encode(tok, add_bos=False, allow_special=False)
        assert not set(plain) & set(bpe.special_tokens.values())


def test_bpe_frequent_chinese_chars_are_single_tokens(bpe):
    from collections import Counter

    counts = Counter(synthetic_chinese(12000, seed=1))
    top = [c for c, _ in counts.most_common() if is_cjk(c)][:100]
    assert all(len(bpe.encode(c, add_bos=False)) == 1 for c in top)
    held_out = synthetic_chinese(300, seed=99)
    assert compression(bpe, held_out) > 2.0  # multi-character words were learned too


def test_bpe_save_load_and_transformers(bpe, tmp_path):
    out = bpe.save(tmp_path / "tok")
    again = load_tokenizer(out)
    assert isinstance(again, BPETokenizer)
    texts = [VECTOR_TEXT, *PLAIN_TEXTS]
    assert [again.encode(t) for t in texts] == [bpe.encode(t) for t in texts]
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert cfg["added_tokens_decoder"]["2047"]["content"] == "<|im_start|>"

    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    for text in texts:
        assert hf(text)["input_ids"] == bpe.encode(text)
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    assert auto(VECTOR_TEXT)["input_ids"] == bpe.encode(VECTOR_TEXT)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (1, 2, 2)


def test_train_from_files_and_errors(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text(synthetic_chinese(300) + "\nplain english words here 123\n" * 50)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n"
                             for i in range(300)))
    tok = train_tokenizer([txt, str(jsonl)], 512, num_spare=8)
    assert tok.vocab_size == 512 and tok.id_to_token(511) == "<|im_start|>"
    first = tok.token_to_id("[UNUSED_TOKEN_0]")
    assert first is not None and 512 - first >= 8  # at least num_spare spare ids
    assert [tok.id_to_token(i) for i in range(first, 506)] == [
        f"[UNUSED_TOKEN_{k}]" for k in range(506 - first)]
    assert tok.decode(tok.encode("def f7(x):", add_bos=False)) == "def f7(x):"

    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([str(txt), str(tmp_path / "missing.txt")], 512)
    with pytest.raises(ValueError, match="multiple of 128"):
        train_tokenizer(["some text"], 1000)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        train_tokenizer([bad], 512)


def test_cli(sp_tok, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="internlm2")
    add_cli(parser.add_subparsers(dest="command", required=True))

    args = parser.parse_args(["tokenizer", "encode", "--tokenizer", str(OFFICIAL),
                              "--text", "Hello world", "--ids-only"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.split() == ["1", "9843", "2028"]
    args = parser.parse_args(["tokenizer", "encode", "--tokenizer", str(OFFICIAL),
                              "--text", "<|im_end|>", "--no-bos"])
    args.func(args)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "[92542]" and "<|im_end|>" in out

    corpus = tmp_path / "c.txt"
    corpus.write_text(("Tokenizers split text into pieces. 42 apples.\n" + synthetic_chinese(50)) * 20)
    args = parser.parse_args(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "384",
                              "--output", str(tmp_path / "out"), "--compare", str(OFFICIAL),
                              "--quiet"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "official" in out and "chinese" in out
    assert load_tokenizer(tmp_path / "out").vocab_size == 384


def test_compression(sp_tok):
    assert compression(sp_tok, "Hello world") == pytest.approx(11 / 2)
    assert compression(sp_tok, ["ab", "cd"]) > 0
