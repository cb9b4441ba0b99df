"""The shipped tokenizer: single digits, single-id specials, ChatML through transformers."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from fastdllm.tasks.gsm8k import format_prompt
from fastdllm.tasks.word_problems import generate_problems
from fastdllm.tokenizer_build import (ENDOFTEXT, IM_END, IM_START, MASK_TOKEN, SPECIAL_TOKENS,
                                      train_tokenizer)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    problems = generate_problems(400, seed=0)
    out = train_tokenizer((p.question + "\n" + p.answer for p in problems),
                          tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=512)
    return out, AutoTokenizer.from_pretrained(str(out))


def test_files_and_config(trained):
    out, _ = trained
    assert sorted(f.name for f in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["eos_token"] == IM_END and cfg["pad_token"] == ENDOFTEXT
    assert not [f for f in out.parent.iterdir() if f.name.startswith(".")]  # no temp dir left


def test_special_tokens_are_single_ids(trained):
    _, tok = trained
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.encode(special, add_special_tokens=False) == [i]
        assert tok.encode(f"a{special}b", add_special_tokens=False)[1] == i
    assert tok.eos_token_id == SPECIAL_TOKENS.index(IM_END)
    assert tok.pad_token_id == SPECIAL_TOKENS.index(ENDOFTEXT)
    assert tok.convert_tokens_to_ids(MASK_TOKEN) == SPECIAL_TOKENS.index(MASK_TOKEN)
    # no BOS or EOS is added around plain text
    assert tok.encode("x", add_special_tokens=True) == tok.encode("x", add_special_tokens=False)


def test_digits_split_individually(trained):
    _, tok = trained
    ids = tok.encode("He pays 1234 dollars, 60 * 15 = 900.", add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("1234") + list("60") + list("15") + list("900")


def test_chat_template_renders(trained):
    _, tok = trained
    messages = [{"role": "user", "content": format_prompt("What is 2 + 3?")}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert no_prompt == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
    with_system = [{"role": "system", "content": "Be brief."}, *messages,
                   {"role": "assistant", "content": "2 + 3 = 5\n#### 5"}]
    assert tok.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 5\n#### 5<|im_end|>\n")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == SPECIAL_TOKENS.index(IM_START) and tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(ids[-2]) == "assistant"  # role names are single tokens


def test_round_trip(trained):
    _, tok = trained
    texts = [p.question + "\n" + p.answer for p in generate_problems(300, seed=99)]
    texts += ["Janet\u2019s ducks lay 16 eggs.  Caf\u00e9 \u00bd \u6f22\u5b57 \U0001f600\n\ttabs",
              " leading space ."]
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_rewrite_replaces_old_dir(tmp_path):
    out = train_tokenizer(["one two three"] * 3, tmp_path / "tok", vocab_size=300)
    (out / "stale.txt").write_text("old")
    train_tokenizer(["four five six"] * 3, out, vocab_size=300)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["tok"]
    assert not (out / "stale.txt").exists()
