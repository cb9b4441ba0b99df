"""Drawing a token per position: greedy, or temperature + top-k + top-p.

The confidence of a drawn token is its probability under the distribution it was drawn from
(after top-k/top-p filtering and renormalisation), as in the official Fast-dLLM v2 sampler.
"""

from __future__ import annotations

import torch


def distribution(logits: torch.Tensor, *, temperature: float, top_p: float,
                 top_k: int) -> torch.Tensor:
    """The sampling distribution (..., V) in float32 for temperature > 0: temperature, then
    top-k, then top-p, renormalised. Speculative sampling uses it for both draft and target."""
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop_sorted = (cumulative - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_tokens(logits: torch.Tensor, *, temperature: float, top_p: float, top_k: int,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: (K, V) for one sequence. Returns (tokens (K,), confidence (K,)) in float32."""
    if temperature == 0.0:
        probs = torch.softmax(logits.float(), dim=-1)
        conf, tokens = probs.max(dim=-1)
        return tokens, conf
    probs = distribution(logits, temperature=temperature, top_p=top_p, top_k=top_k)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    conf = probs.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, conf


def draw(logits: torch.Tensor, segments: list[tuple[int, int]], settings: list,
         generators: list) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (R, V): the rows of one step, sequence i owning rows segments[i] = (a, b).
    Returns (tokens (R,), confidences (R,) float32). All-greedy steps are one batched draw; a
    sampled sequence draws exactly its own rows, so its generator advances as it would alone."""
    if all(s.temperature == 0.0 for s in settings):
        conf, tokens = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        return tokens, conf
    out_t, out_c = [], []
    for (a, b), s, g in zip(segments, settings, generators):
        t, c = sample_tokens(logits[a:b], temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                             generator=g)
        out_t.append(t)
        out_c.append(c)
    return torch.cat(out_t), torch.cat(out_c)


def sample_batch(logits: torch.Tensor, settings: list, generators: list,
                 lengths: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (n, K, V); settings[i] has temperature/top_p/top_k. Greedy rows are done together.
    lengths[i]: how many of row i's K positions are real (the rest is padding); a sampled row
    draws only those, so its generator advances exactly as it would outside the batch."""
    n, K = logits.shape[:2]
    lengths = lengths or [K] * n
    tokens, conf = draw(logits.reshape(n * K, -1), [(i * K, i * K + k) for i, k in enumerate(lengths)],
                        settings, generators)
    if tokens.shape[0] == n * K:
        return tokens.view(n, K), conf.view(n, K)
    out_t = torch.zeros(n, K, dtype=tokens.dtype, device=tokens.device)
    out_c = torch.zeros(n, K, dtype=conf.dtype, device=conf.device)
    start = 0
    for i, k in enumerate(lengths):
        out_t[i, :k], out_c[i, :k] = tokens[start:start + k], conf[start:start + k]
        start += k
    return out_t, out_c


def draw_entropy(logits: torch.Tensor, segments: list[tuple[int, int]], settings: list) -> torch.Tensor:
    """logits (R, V), sequence i owning rows segments[i]. The entropy in nats (R,) float32 of
    the distribution each row's token is drawn from (the plain softmax for greedy rows;
    temperature, top-k, top-p for sampled ones): what the entropy-bounded rule (selection.py)
    spends. Zero-probability tokens (the suppressed [MASK]) cost nothing."""
    if all(s.temperature == 0.0 for s in settings):
        return torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum(dim=-1)
    return torch.cat([
        torch.special.entr(
            torch.softmax(logits[a:b].float(), dim=-1) if s.temperature == 0.0
            else distribution(logits[a:b], temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        ).sum(dim=-1)
        for (a, b), s in zip(segments, settings)])


def calibrate(logits: torch.Tensor, tokens: torch.Tensor, conf: torch.Tensor,
              segments: list[tuple[int, int]], settings: list) -> torch.Tensor:
    """The confidences the decoding rule reads: for a row whose settings ask for it
    (`calibrated`), the drawn token's probability under softmax(logits / confidence_temperature);
    every other row keeps `conf` as drawn. logits (R, V), tokens and conf (R,)."""
    out = conf.clone()
    for (a, b), s in zip(segments, settings):
        if a < b and s.calibrated:
            probs = torch.softmax(logits[a:b].float() / s.confidence_temperature, dim=-1)
            out[a:b] = probs.gather(-1, tokens[a:b, None]).squeeze(-1)
    return out
