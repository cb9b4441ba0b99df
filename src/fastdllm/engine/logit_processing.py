"""What a request may do to the logits before a token is drawn, and what it may read back.

- `logit_bias` (OpenAI's): a value in [-100, 100] added to a token's logit before every draw
  (-100 bans the token in practice, +100 all but forces it).
- `presence_penalty` / `frequency_penalty` (OpenAI's): subtracted from the logit of every token
  this sequence has made *final* so far (its generated tokens with no [MASK] before them),
  once per distinct token (presence) and once per use (frequency). In diffusion decoding a
  block's positions are decided in parallel, so the tokens unmasked earlier in the same block
  but still behind a [MASK] do not count yet; they count from the step they become final
  (AR decoding: every generated token is final at once, the OpenAI semantics).
- `logprobs`: each generated token's log-probability under the distribution it was drawn from
  (after bias, penalties, temperature, top-k and top-p: the draw's confidence), and the `k` most
  likely tokens of that same distribution.

Everything here runs on the eager step only: a step with such a row never takes a static
(captured) step, which draws greedy tokens from unprocessed logits.
"""

from __future__ import annotations

import math

import torch

from .sampling import distribution

# what a log-probability of 0 is reported as (JSON has no -inf); the value vLLM uses
LOGPROB_FLOOR = -9999.0


def apply_bias(logits: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> None:
    """logits (K, V), in place: + bias[id] on column id (ids past the vocabulary are ignored:
    the server refuses them, a padded vocabulary has no such rows to draw)."""
    ids = [i for i, _ in bias if i < logits.shape[-1]]
    if ids:
        values = torch.tensor([v for i, v in bias if i < logits.shape[-1]], dtype=logits.dtype,
                              device=logits.device)
        logits[:, ids] += values


def apply_penalties(logits: torch.Tensor, final_ids: list[int], presence: float,
                    frequency: float) -> None:
    """logits (K, V), in place: - presence for each token in `final_ids`, - frequency per use."""
    if not final_ids or (presence == 0 and frequency == 0):
        return
    ids = torch.tensor(final_ids, dtype=torch.long, device=logits.device)
    counts = torch.bincount(ids, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
    logits -= presence * (counts > 0).to(logits.dtype) + frequency * counts


def process(logits: torch.Tensor, rows: list, spans: list[tuple[int, int]]) -> None:
    """logits (R, V) of one step, in place: each row's bias and penalties on its own span."""
    for (seq, _), (a, b) in zip(rows, spans):
        p = seq.params
        if not p.processes_logits or a == b:
            continue
        apply_bias(logits[a:b], p.logit_bias)
        apply_penalties(logits[a:b], seq.final_ids(), p.presence_penalty, p.frequency_penalty)


def top_logprobs(logits: torch.Tensor, params, k: int) -> list[list[tuple[int, float]]]:
    """logits (K, V) of one sequence -> for each row, the k most likely (token, log-probability)
    pairs of the distribution its token is drawn from, most likely first."""
    if params.temperature == 0.0:
        logp = torch.log_softmax(logits.float(), dim=-1)
    else:
        logp = distribution(logits, temperature=params.temperature, top_p=params.top_p,
                            top_k=params.top_k).log()
    values, ids = logp.topk(k, dim=-1)
    return [[(int(i), floor(v)) for i, v in zip(row_ids, row_values)]
            for row_ids, row_values in zip(ids.tolist(), values.tolist())]


def record_alternatives(logits: torch.Tensor, rows: list, spans: list[tuple[int, int]]) -> None:
    """Hands each row that asked for `logprobs: k > 0` its alternatives for this step's logit
    positions (`seq.alternatives`, read by `Sequence.advance` for the positions it decides)."""
    for (seq, _), (a, b) in zip(rows, spans):
        k = seq.params.logprobs
        seq.alternatives = top_logprobs(logits[a:b], seq.params, k) if k and a < b else None


def record_drawn(conf: torch.Tensor, rows: list, spans: list[tuple[int, int]]) -> None:
    """Hands each row that reports logprobs and whose rule reads other confidences than the
    drawing distribution's (`calibrated`) its drawn tokens' probabilities under that
    distribution (`seq.drawn`): a token's log-probability is the one it was drawn with."""
    for (seq, _), (a, b) in zip(rows, spans):
        p = seq.params
        seq.drawn = conf[a:b].tolist() if p.logprobs is not None and p.calibrated and a < b else None


def floor(logprob: float) -> float:
    """A log-probability JSON can carry: -inf (a probability of 0) becomes LOGPROB_FLOOR."""
    return logprob if math.isfinite(logprob) and logprob > LOGPROB_FLOOR else LOGPROB_FLOOR


def needs_eager(rows: list) -> bool:
    """Whether a step must run eagerly (the static steps neither process logits nor report
    alternatives)."""
    return any(s.params.processes_logits or s.params.logprobs for s, _ in rows)
