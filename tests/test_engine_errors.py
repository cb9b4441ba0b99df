"""Bad input to `LLM.load` / `LLM.generate`: a FastDLLMError whose message names the problem and
the fix, raised before any decoding starts, and the LLM stays usable afterwards."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from fastdllm import LLM
from fastdllm.errors import FastDLLMError
from fixtures import update_config


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen2(qwen2_ckpt) -> LLM:
    return LLM.load(qwen2_ckpt, device="cpu")


@contextmanager
def raises(*fragments: str):
    """pytest.raises(FastDLLMError) whose message contains every fragment (case-insensitive)."""
    with pytest.raises(FastDLLMError) as info:
        yield info
    message = str(info.value).lower()
    for fragment in fragments:
        assert fragment.lower() in message, f"{fragment!r} not in {message!r}"


# ---------------------------------------------------------------- loading
def test_missing_directory(tmp_path):
    with raises("does not exist", "config.json"):
        LLM.load(tmp_path / "nowhere", device="cpu")


def test_file_or_directory_without_a_config(tmp_path, qwen2_ckpt):
    with raises("is a file", "directory"):
        LLM.load(qwen2_ckpt / "config.json", device="cpu")
    (tmp_path / "empty").mkdir()
    with raises("no config.json", "hugging face model directory"):
        LLM.load(tmp_path / "empty", device="cpu")


def test_unreadable_config(qwen2_ckpt, ckpt_copy):
    d = ckpt_copy(qwen2_ckpt)
    (d / "config.json").write_text('{"model_type": "qwen2",')
    with raises("not valid json", "re-download or fix"):
        LLM.load(d, device="cpu")


def test_unsupported_architecture(qwen2_ckpt, ckpt_copy):
    d = ckpt_copy(qwen2_ckpt)
    update_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with raises("unsupported architecture", "gpt2", "supports qwen2, llama, qwen3"):
        LLM.load(d, device="cpu")


def test_mask_id_outside_the_vocabulary(qwen2_ckpt):
    with raises("mask token id 100000", "outside the vocabulary", "|<mask>|"):
        LLM.load(qwen2_ckpt, device="cpu", mask_token_id=100_000)


# ---------------------------------------------------------------- decoding options
def test_sub_block_size_must_divide_block_size(qwen2):
    with raises("sub_block_size (3) must divide block_size (8)", "--sub-block-size 8"):
        qwen2.generate("Hi", block_size=8, sub_block_size=3)
    with raises("sub_block_size (5) must divide block_size (32)", "--sub-block-size 8"):
        qwen2.generate("Hi", sub_block_size=5)


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.01, 2.0])
def test_threshold_outside_zero_one(qwen2, threshold):
    with raises("threshold must be in (0, 1]", str(threshold), "1.0 unmasks one token"):
        qwen2.generate("Hi", threshold=threshold)


def test_non_positive_max_new_tokens_and_unknown_mode(qwen2):
    with raises("max_new_tokens must be a positive integer"):
        qwen2.generate("Hi", max_new_tokens=0)
    with raises("mode must be one of", "diffusion", "ar"):
        qwen2.generate("Hi", mode="autoregressive")


# ---------------------------------------------------------------- prompts and context
def test_empty_prompt(qwen2):
    for empty in ([], ""):
        with raises("prompt is empty", "at least one token"):
            qwen2.generate(empty)
    with raises("no prompts given"):
        qwen2.generate_batch([])


def test_prompt_longer_than_the_context(qwen2):
    context = qwen2.context_length
    with raises(f"{context} tokens", f"context is {context}", "shorten the prompt"):
        qwen2.generate([5] * context)


def test_max_new_tokens_beyond_the_context(qwen2):
    context = qwen2.context_length
    with raises("exceeds the model's context", f"at most {context - 10}"):
        qwen2.generate([5] * 10, max_new_tokens=context)
    with raises("exceeds the model's context"):  # one prompt of a batch is enough
        qwen2.generate_batch([[5] * 3, [5] * 300], max_new_tokens=250)
    # exactly filling the context is allowed
    result = qwen2.generate([5] * (context - 6), mode="ar", max_new_tokens=6, stop_token_ids=[])
    assert len(result.token_ids) == 6


def test_prompt_ids_outside_the_vocabulary(qwen2):
    vocab = qwen2.config.vocab_size
    with raises(f"[{vocab}]", "outside the vocabulary"):
        qwen2.generate([5, vocab, 6])
    with raises("[-1]", "outside the vocabulary"):
        qwen2.generate([-1, 5])


def test_diffusion_needs_a_mask_token(no_tokenizer_ckpt):
    llm = LLM.load(no_tokenizer_ckpt, device="cpu")  # adapted (bd_size), but nothing names a mask
    assert llm.special.mask_token_id is None and llm.adapted
    with raises("needs a mask token", "--mask-token-id", "--mode ar"):
        llm.generate([5, 6, 7], max_new_tokens=8)
    # the failed request left nothing behind: AR decoding still works
    assert llm.generate([5, 6, 7], mode="ar", max_new_tokens=8).token_ids


# issue 21, class 11: a checkpoint never adapted for block diffusion decodes AR by default and
# refuses diffusion in every front end (the server's refusal: tests/test_server_hostile.py)
@pytest.mark.parametrize("which", ["ar_ckpt", "stories260k_dir"])
def test_never_adapted_checkpoints_refuse_diffusion(which, request, capsys):
    from fastdllm.cli import main

    ckpt = request.getfixturevalue(which)
    llm = LLM.load(ckpt, device="cpu")
    assert not llm.adapted and llm.decode_config().mode == "ar"
    prompt = "Once upon a time"
    default = llm.generate(prompt, max_new_tokens=8)
    assert default.params.mode == "ar"
    assert default.token_ids == llm.generate(prompt, mode="ar", max_new_tokens=8).token_ids
    for call in (lambda: llm.generate(prompt, mode="diffusion", max_new_tokens=8),
                 lambda: llm.generate_batch([prompt, prompt], mode="diffusion"),
                 lambda: llm.decode_config(mode="diffusion")):
        with raises("never adapted for block diffusion", "no bd_size and no mask_token_id",
                    "fastdllm train", "--mode ar") as e:
            call()
        assert e.value.field == "mode"
    for command in ("generate", "chat") if which == "ar_ckpt" else ("generate",):  # chat: a template
        argv = [command, "--model", str(ckpt), "--device", "cpu", "--mode", "diffusion"]
        if command == "generate":
            argv += ["--prompt", prompt]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "never adapted" in err and "--mode ar" in err and "Traceback" not in err
    # naming the mask token says it was adapted: diffusion is the caller's choice again
    mask = llm.special.mask_token_id
    if mask is not None:
        told = LLM.load(ckpt, device="cpu", mask_token_id=mask)
        assert told.adapted and told.generate(prompt, max_new_tokens=4).params.mode == "diffusion"


def test_shipped_ar_model_is_not_adapted():
    from fixtures import REPO_ROOT

    ar = LLM.load(REPO_ROOT / "models" / "fastdllm-wp-ar", device="cpu")
    assert not ar.adapted and ar.decode_config().mode == "ar"
    assert LLM.load(REPO_ROOT / "models" / "fastdllm-wp-diffusion", device="cpu").adapted


def test_text_prompt_without_tokenizer(no_tokenizer_ckpt):
    llm = LLM.load(no_tokenizer_ckpt, device="cpu")
    with raises("no tokenizer files", "--prompt-ids"):
        llm.generate("Hello", mode="ar")
    with raises("no chat template"):
        llm.generate(messages=[{"role": "user", "content": "Hello"}], mode="ar")
    assert llm.generate([5, 6, 7], mode="ar", max_new_tokens=4).text is None


def test_errors_leave_the_llm_usable(qwen2):
    before = qwen2.generate([5, 6, 7], block_size=8, sub_block_size=4, max_new_tokens=10).token_ids
    for bad in (dict(threshold=0.0), dict(max_new_tokens=10_000), dict(sub_block_size=3)):
        with pytest.raises(FastDLLMError):
            qwen2.generate([5, 6, 7], block_size=8, **bad)
    after = qwen2.generate([5, 6, 7], block_size=8, sub_block_size=4, max_new_tokens=10).token_ids
    assert after == before
