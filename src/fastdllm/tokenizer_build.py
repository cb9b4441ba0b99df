"""Train the shipped model's tokenizer: byte-level BPE with single digits and ChatML specials.

This module owns the tokenizer of the small Qwen2-architecture model we train from scratch and
then adapt into a block-diffusion model (Fast-dLLM v2, arXiv 2509.26328). Choices:

- Byte-level BPE (GPT-2/Qwen style), so any text round-trips through encode/decode.
- Digits are split one by one before BPE (as Qwen2 does), so `128` is always `1 2 8`: a tiny
  model learns column arithmetic on a fixed ten-digit alphabet instead of memorising multi-digit
  tokens.
- Special tokens, with ids 0..3 in this order: `<|endoftext|>` (document separator and padding;
  no BOS is added, like Qwen2.5), `<|im_start|>` and `<|im_end|>` (ChatML turns; `<|im_end|>` is
  the EOS that ends an assistant reply), and `|<MASK>|`, the diffusion mask token of Fast-dLLM
  v2. Padding shares `<|endoftext|>` because padded positions are masked out of attention and
  the loss, so a separate id would only grow the embedding.
- The chat template is Qwen2.5's ChatML without its default system message: a tiny model's
  context is short, and the same template is used for training and inference, so nothing needs
  the extra tokens.
- Default vocabulary 1024 (see `DEFAULT_VOCAB_SIZE` for why).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .atomic import atomic_dir
from .errors import FastDLLMError
from .model.checkpoint import MASK_TOKEN

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, MASK_TOKEN)

# 256 byte tokens + 4 specials leave 764 merges. On 20k of our word problems an unlimited
# vocabulary stops at ~1400 entries (every pair seen twice is merged) and only shortens a problem
# from ~85 to ~82 tokens; the extra ~400 tokens are rare, so a tiny model would train their
# embeddings poorly. Digits never merge, so arithmetic does not depend on the vocabulary size.
# Training can stop below `vocab_size` when the corpus runs out of pairs: size the model's
# embedding from `len(tokenizer)`, not from this constant.
DEFAULT_VOCAB_SIZE = 1024
DEFAULT_MODEL_MAX_LENGTH = 2048

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# Every training sequence is rendered through the chat template, so its role names are as
# common as the texts themselves; training them in makes each role name a single token.
_ROLE_NAMES = "system\nuser\nassistant\n"


def _with_role_names(texts: Iterable[str]) -> Iterator[str]:
    n = 0
    for text in texts:
        n += 1
        yield text
    for _ in range(max(2, n)):
        yield _ROLE_NAMES


def build_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """A trained `tokenizers.Tokenizer` (not yet saved)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise FastDLLMError(f"vocab_size {vocab_size} is too small: byte-level BPE needs 256 byte "
                            f"tokens plus {len(SPECIAL_TOKENS)} special tokens", field="vocab_size")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(_with_role_names(texts), trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # already there; makes the intent explicit
    return tok


def tokenizer_config(model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> dict:
    """The `tokenizer_config.json` that makes transformers load the tokenizer as ChatML."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "mask_token": MASK_TOKEN,
        "extra_special_tokens": [IM_START, IM_END],  # transformers 5 name
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        # transformers' default clean-up rewrites " ." to "." and breaks the round trip
        "clean_up_tokenization_spaces": False,
    }


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> Path:
    """Train on `texts` and write `tokenizer.json` and `tokenizer_config.json` to `out_dir`
    atomically (temp dir, then rename over any old one). Returns `out_dir`."""
    tok = build_bpe(texts, vocab_size)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        config = tokenizer_config(model_max_length)
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
