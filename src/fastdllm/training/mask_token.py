"""The [MASK] token a block-diffusion model denoises (paper §3.2).

A base AR checkpoint has no mask token. `add_mask_token` adds `|<MASK>|` (the official
Fast-dLLM v2 spelling) to the tokenizer as a special token, so its id is the tokenizer's old
length (151665 for Qwen2.5, whose embedding already has spare rows up to 151936). The embedding
(and an untied lm_head) grows only when that id does not fit; it then grows to a multiple of
`pad_vocab_to_multiple_of` (tensor-core friendly shapes, as the Qwen vocabularies are padded).
The mask row, and any new padding rows, start at the mean of the rows the tokenizer used
before: a neutral input embedding, and an output row whose logit starts at the average.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import FastDLLMError
from ..model.checkpoint import MASK_TOKEN
from ..model.transformer import Transformer
from ..rounding import round_up


def tokenizer_mask_id(tokenizer) -> int | None:
    return tokenizer.get_vocab().get(MASK_TOKEN)


def add_to_tokenizer(tokenizer) -> bool:
    """Add `|<MASK>|` as a special token if absent; True when it was added."""
    if tokenizer_mask_id(tokenizer) is not None:
        return False
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)], special_tokens=True)
    return True


def _grown(weight: torch.Tensor, rows: int, fill_from: int, fill_rows: list[int]) -> torch.Tensor:
    """Copy of `weight` (V, H) with `rows` rows; rows in `fill_rows` set to the mean of the
    first `fill_from` rows."""
    new = torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    new[: weight.shape[0]] = weight
    mean = weight[:fill_from].float().mean(0).to(weight.dtype)
    new[fill_rows] = mean
    return new


@torch.no_grad()
def set_rows(model: Transformer, vocab_size: int, fill_from: int, fill_rows: list[int]) -> None:
    """Resize embedding / lm_head to `vocab_size` rows (never shrinking) and set `fill_rows` to
    the mean of the first `fill_from` rows, in place; `model.config.vocab_size` follows."""
    body = model.model
    emb = _grown(body.embed_tokens.weight.data, vocab_size, fill_from, fill_rows)
    body.embed_tokens = nn.Embedding(vocab_size, emb.shape[1], device="meta")
    body.embed_tokens.weight = nn.Parameter(emb)
    if model.config.tie_word_embeddings:
        model.lm_head = nn.Linear(emb.shape[1], vocab_size, bias=False, device="meta")
        model.lm_head.weight = body.embed_tokens.weight
    else:
        head = _grown(model.lm_head.weight.data, vocab_size, fill_from, fill_rows)
        model.lm_head = nn.Linear(head.shape[1], vocab_size, bias=False, device="meta")
        model.lm_head.weight = nn.Parameter(head)
    model.config = dataclasses.replace(model.config, vocab_size=vocab_size)


def add_mask_token(model: Transformer, tokenizer, pad_vocab_to_multiple_of: int) -> int:
    """Make sure tokenizer and model share a mask token; returns its id and records it in
    `model.config.mask_token_id`."""
    cfg = model.config
    old_len = len(tokenizer)
    added = add_to_tokenizer(tokenizer)
    mask_id = tokenizer_mask_id(tokenizer)
    if cfg.mask_token_id is not None and cfg.mask_token_id != mask_id and not added:
        raise FastDLLMError(
            f"config.json says mask_token_id={cfg.mask_token_id} but the tokenizer's {MASK_TOKEN} "
            f"is id {mask_id}; fix one of them so they agree")
    if cfg.mask_token_id is not None and added:
        # the checkpoint names a mask id its tokenizer does not spell |<MASK>|: keep the model's
        raise FastDLLMError(
            f"config.json sets mask_token_id={cfg.mask_token_id} but the tokenizer has no {MASK_TOKEN} "
            "token; ship the checkpoint's tokenizer with it (tokenizer: DIR) or remove mask_token_id")
    vocab = cfg.vocab_size
    if added or mask_id >= vocab:
        new_vocab = round_up(mask_id + 1, pad_vocab_to_multiple_of) if mask_id >= vocab else vocab
        fill = [mask_id] + list(range(vocab, new_vocab))
        set_rows(model, new_vocab, fill_from=min(old_len, vocab), fill_rows=sorted(set(fill)))
    model.config = dataclasses.replace(model.config, mask_token_id=mask_id)
    return mask_id
