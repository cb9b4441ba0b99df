"""Targets and loss of the training objectives (paper §3.2, "Token shift" and the loss).

Token shift. The engine decodes a masked token i from the output at position i - 1, the AR
convention the base model was trained with (paper §3.2: "if x_i is masked, the model uses the
hidden state at i-1 to predict x_i"). So the target stored at output position j is token j + 1
when token j + 1 is masked (and in the same document). `token_shift: false` (ablation) stores
token j at position j instead.

Which stream predicts a block's first token. For j + 1 inside a block, position j is in the
same noisy block: the noisy half's output, as in the engine, which reads shifted logits of the
block being denoised. For j + 1 = the first token of block b, position j is the last token of
block b - 1. At inference that block is committed: the engine (and the official
`Fast_dLLM_QwenForCausalLM.generate`, which takes `logits[:, -1]` of the forward that commits a
block) predicts it from the output of the *clean* block b - 1 over the clean prefix, which is
exactly the clean half's output at j. The official training code instead shifts the noisy
half's logits by one, so it learns block b's first token from a corrupted block b - 1 that
inference never shows. We default to the clean stream (`shift_source: clean`, matching the
engine) and keep `shift_source: noisy` to reproduce the official recipe. `output_index` gives,
per noisy position j, the row index (j or L + j) whose logits are read.

Loss. `none` (official): cross-entropy summed over all targets of the optimizer step, divided
by their number (the same mean however the step is split into micro-batches and processes).
`inverse_t`: each target weighted by 1 / (its block's mask probability: p, or 1 - p in the
complementary twin, floored at eps) and divided by the number of tokens that *could* be
targets; by E[masked / p] = 1 this is an unbiased estimate of the per-token masked-diffusion
NLL bound (LLaDA / MDLM's 1/t weighting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def shift_left(x: torch.Tensor, fill) -> torch.Tensor:
    """out[..., j] = x[..., j + 1]; the last position gets `fill`."""
    out = torch.full_like(x, fill)
    out[..., :-1] = x[..., 1:]
    return out


def shifted_targets(tokens: torch.Tensor, is_target: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """(n, L): token j + 1 at position j where token j + 1 is a target of the same document."""
    same_doc = shift_left(doc_ids, -1) == doc_ids
    keep = shift_left(is_target, False) & same_doc
    return torch.where(keep, shift_left(tokens, 0), torch.full_like(tokens, IGNORE))


def diffusion_targets(tokens: torch.Tensor, masked: torch.Tensor, doc_ids: torch.Tensor,
                      token_shift: bool) -> torch.Tensor:
    """Targets (n, L) aligned with the noisy half's output positions; IGNORE elsewhere."""
    if token_shift:
        return shifted_targets(tokens, masked, doc_ids)
    return torch.where(masked, tokens, torch.full_like(tokens, IGNORE))


def ar_targets(tokens: torch.Tensor, loss_mask: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets: every loss-bearing token, predicted from its predecessor."""
    return shifted_targets(tokens, loss_mask, doc_ids)


def output_index(seq_len: int, block_size: int, token_shift: bool, shift_source: str) -> torch.Tensor:
    """(L,) long: for noisy position j, the index in the 2L row whose output predicts target j."""
    j = torch.arange(seq_len)
    if token_shift and shift_source == "clean":
        return torch.where((j + 1) % block_size == 0, j + seq_len, j)
    return j


def inverse_t_weights(p: torch.Tensor, twin: torch.Tensor, eps: float, token_shift: bool) -> torch.Tensor:
    """(n, L) weights 1 / P(token masked), aligned like the targets. p: (n, L) block
    probabilities of the first view; twin: (n,) bool, rows that are complementary twins."""
    prob = torch.where(twin[:, None], (1.0 - p).clamp_min(eps), p)
    weights = 1.0 / prob
    return shift_left(weights, 0.0) if token_shift else weights


def target_loss_sum(logits: torch.Tensor, targets: torch.Tensor,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over targets of (weighted) cross-entropy, in float32. logits (n, L, V), targets (n, L)."""
    valid = targets != IGNORE
    ce = F.cross_entropy(logits[valid].float(), targets[valid], reduction="none")
    if weights is not None:
        ce = ce * weights[valid]
    return ce.sum()


def certainty_sums(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Certainty distillation terms over the targets (dParallel's certainty forcing, arXiv
    2509.26488, plus a penalty on confident mistakes), summed in float32:

    - certainty: the entropy of the predicted distribution at every target the model already
      predicts right (argmax == target): minimising it makes right predictions confident
      earlier, which a threshold rule turns into more tokens per step;
    - confident mistakes: -log(1 - p_argmax) at every target predicted wrong: minimising it
      pulls probability off a wrong argmax, which a threshold rule would otherwise accept.

    The argmax and the right/wrong split are taken without gradient (they select terms); the
    gradient flows through the entropy and p_argmax. logits (n, L, V), targets (n, L)."""
    valid = targets != IGNORE
    logp = F.log_softmax(logits[valid].float(), dim=-1)  # (N, V)
    tgt = targets[valid]
    pred = logp.detach().argmax(dim=-1)
    right = pred == tgt
    entropy = -(logp.exp() * logp).sum(dim=-1)
    p_max = logp.gather(-1, pred[:, None]).squeeze(-1).exp()
    wrong = -torch.log1p(-p_max.clamp(max=1.0 - 1e-6))
    return entropy[right].sum(), wrong[~right].sum()
