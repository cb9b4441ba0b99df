"""Exact log-likelihood of a continuation under the decoder that would write it (lm-eval's
`loglikelihood` / `loglikelihood_rolling`).

A block-diffusion model has no single left-to-right factorisation, so we score with the
distribution our engine actually samples from, token by token, in one of two exact ways:

- **AR mode** (`mode="ar"`): plain causal scoring, `sum_i log p(x_i | x_<i)` from one causal
  forward (the logit at `i - 1` predicts `i`), the distribution `mode="ar"` decoding draws from.
- **diffusion mode** (block-wise left to right, consistent with the token shift): token `i`
  in block `b` at offset `k` is scored as the engine's uncached decoder would write it with
  sub-blocks of one token: every block before `b` committed (clean, block-causal), block `b`
  holding the clean tokens before `i` and `[MASK]` from `i` to the block's end (the whole block
  width, as in decoding). With the token shift, `x_i` is read from the output at `i - 1`; a
  block's first token (`k = 0`) from the clean stream's output at `i - 1` (the commit forward
  of the previous block, exactly where the engine draws it). Without the shift (the ablation)
  `x_i` is read from its own masked position. The `[MASK]` token is excluded from the
  softmax, as the engine never draws it. The chain rule over `i` makes the sum the exact
  log-probability of that left-to-right decoding path.

The official Fast-dLLM evaluation instead masks only the first continuation token and scores
the whole continuation from one forward; that is not a likelihood of any decoding path, so we
do not use it.

Cost: one forward per chunk of "copies". Each masked block state (b, k) is one copy of B tokens
appended after the clean sequence; a copy sees itself (bidirectionally) and the clean blocks
strictly before `b`, the clean stream is block-causal (the three-part training mask of
`training/attention_mask.py`, generalised from one noisy copy to several). So a continuation of
n tokens costs about n * B extra positions, split into forwards of at most `copies_per_forward`
copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FastDLLMError
from ..model.transformer import Transformer

CLEAN = -1  # copy id of the clean stream


@dataclass(frozen=True)
class ScoringPlan:
    """One forward: inputs, attention rule, and which output scores which continuation token."""
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    mask: torch.Tensor  # (1, 1, T, T) bool, True = may attend
    source: torch.Tensor  # (n,) output index whose logits predict each target
    target: torch.Tensor  # (n,) token ids scored
    target_index: torch.Tensor  # (n,) index of each target in the continuation


def scoring_allowed(copy_q: torch.Tensor, copy_k: torch.Tensor, block_q: torch.Tensor,
                    block_k: torch.Tensor) -> torch.Tensor:
    """May query (copy_q, block_q) attend key (copy_k, block_k)? Clean is copy -1."""
    q_clean, k_clean = copy_q == CLEAN, copy_k == CLEAN
    clean_to_clean = q_clean & k_clean & (block_k <= block_q)
    copy_to_self = ~q_clean & (copy_k == copy_q)
    copy_to_clean = ~q_clean & k_clean & (block_k < block_q)
    return clean_to_clean | copy_to_self | copy_to_clean


def diffusion_plans(context: list[int], continuation: list[int], *, block_size: int,
                    token_shift: bool, mask_token_id: int,
                    copies_per_forward: int = 64) -> list[ScoringPlan]:
    """The forwards that score `continuation` after `context` block-wise left to right."""
    seq = context + continuation
    n_ctx, total, B = len(context), len(context) + len(continuation), block_size
    clean = torch.tensor(seq, dtype=torch.long)
    # which output predicts token i: ("clean", i - 1) or (copy (b, k), offset within the copy)
    from_clean: list[int] = []
    by_copy: dict[tuple[int, int], int] = {}
    for i in range(n_ctx, total):
        b, k = divmod(i, B)
        if token_shift and k == 0:
            from_clean.append(i)
        else:
            by_copy[(b, k)] = i
    copies = sorted(by_copy)
    chunks = [copies[j:j + copies_per_forward] for j in range(0, len(copies), copies_per_forward)]
    if not chunks:
        chunks = [[]]
    plans = []
    for n_chunk, chunk in enumerate(chunks):
        ids, pos, copy_id, block = [clean], [torch.arange(total)], [torch.full((total,), CLEAN)], \
            [torch.arange(total) // B]
        sources, targets = [], []
        if n_chunk == 0:  # block starts come from the clean stream (shared by every chunk)
            sources += [i - 1 for i in from_clean]
            targets += from_clean
        offset = total
        for c, (b, k) in enumerate(chunk):
            start = b * B
            tokens = torch.full((B,), mask_token_id, dtype=torch.long)
            tokens[:k] = clean[start:start + k]  # clean before i, [MASK] from i to the block end
            ids.append(tokens)
            pos.append(torch.arange(start, start + B))
            copy_id.append(torch.full((B,), c))
            block.append(torch.full((B,), b))
            i = by_copy[(b, k)]
            sources.append(offset + k - 1 if token_shift else offset + k)
            targets.append(i)
            offset += B
        copy_t, block_t = torch.cat(copy_id), torch.cat(block)
        mask = scoring_allowed(copy_t[:, None], copy_t[None, :], block_t[:, None], block_t[None, :])
        plans.append(ScoringPlan(
            input_ids=torch.cat(ids), positions=torch.cat(pos), mask=mask[None, None],
            source=torch.tensor(sources, dtype=torch.long),
            target=clean[torch.tensor(targets, dtype=torch.long)] if targets else clean[:0],
            target_index=torch.tensor(targets, dtype=torch.long) - n_ctx))
    return plans


def ar_plan(context: list[int], continuation: list[int]) -> ScoringPlan:
    seq = torch.tensor(context + continuation, dtype=torch.long)
    t = len(seq)
    idx = torch.arange(len(context), t)
    return ScoringPlan(input_ids=seq, positions=torch.arange(t),
                       mask=torch.ones(t, t, dtype=torch.bool).tril()[None, None],
                       source=idx - 1, target=seq[idx], target_index=idx - len(context))


@dataclass(frozen=True)
class Scores:
    """Per continuation token: log p (n,) float64, whether it is the argmax (n,) bool, and the
    `top` most likely tokens at its place, (n, top) ids and float64 log-probabilities."""
    logp: torch.Tensor
    greedy: torch.Tensor
    top_ids: torch.Tensor
    top_logp: torch.Tensor


def continuation_logprobs(model: Transformer, context: list[int], continuation: list[int], *,
                          mode: str, block_size: int, token_shift: bool = True,
                          mask_token_id: int | None = None,
                          copies_per_forward: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each continuation token (n,) float64, whether each is the argmax (n,) bool),
    under the decomposition of the module docstring for `mode` "ar" or "diffusion"."""
    s = continuation_scores(model, context, continuation, mode=mode, block_size=block_size,
                            token_shift=token_shift, mask_token_id=mask_token_id,
                            copies_per_forward=copies_per_forward)
    return s.logp, s.greedy


@torch.inference_mode()
def continuation_scores(model: Transformer, context: list[int], continuation: list[int], *,
                        mode: str, block_size: int, token_shift: bool = True,
                        mask_token_id: int | None = None, copies_per_forward: int = 64,
                        top: int = 0) -> Scores:
    """`continuation_logprobs` plus the `top` most likely tokens at each place (the server's
    `echo` + `logprobs` reads them)."""
    if not context:
        raise FastDLLMError("the context is empty; score a continuation after at least one token "
                            "(e.g. BOS)", field="context")
    n = len(continuation)
    logp = torch.zeros(n, dtype=torch.float64)
    greedy = torch.zeros(n, dtype=torch.bool)
    top_ids = torch.zeros(n, top, dtype=torch.long)
    top_logp = torch.zeros(n, top, dtype=torch.float64)
    if not continuation:
        return Scores(logp, greedy, top_ids, top_logp)
    if mode == "ar":
        plans = [ar_plan(context, continuation)]
    elif mode == "diffusion":
        if mask_token_id is None:
            raise FastDLLMError("diffusion scoring needs the model's mask token; this checkpoint "
                                "has none (score with mode='ar')", field="mask_token_id")
        plans = diffusion_plans(context, continuation, block_size=block_size,
                                token_shift=token_shift, mask_token_id=mask_token_id,
                                copies_per_forward=copies_per_forward)
    else:
        raise FastDLLMError(f"mode must be 'ar' or 'diffusion', got {mode!r}", field="mode")
    device = next(model.parameters()).device
    for plan in plans:
        if len(plan.source) == 0:
            continue
        logits = model(plan.input_ids[None].to(device), plan.positions[None].to(device),
                       plan.mask.to(device), logits_slice=plan.source[None].to(device))[0]
        logits = logits.double()
        if mode == "diffusion":
            logits[:, mask_token_id] = float("-inf")  # the engine never draws [MASK]
        lp = torch.log_softmax(logits, dim=-1).cpu()
        target = plan.target
        logp[plan.target_index] = lp.gather(1, target[:, None])[:, 0]
        greedy[plan.target_index] = lp.argmax(dim=-1) == target
        if top:
            values, ids = lp.topk(top, dim=-1)
            top_logp[plan.target_index], top_ids[plan.target_index] = values, ids
    return Scores(logp, greedy, top_ids, top_logp)
