"""The merged self-speculative cycle: ONE forward of one model verifies the previous draft
causally and drafts the next run for every possible outcome of that verification (the layout of
TiDAR, arXiv 2511.08923, on a Fast-dLLM v2 model), so each forward yields accepted + 1 tokens.

Row layout for a sequence holding L tokens with k pending drafts d_L..d_{L+k-1} and draft
length K (docs/design.md, "The merged forward", draws the mask):

    V   = [x_{L-1}, d_L, .., d_{L+k-1}]       positions L-1 .. L+k-1, cache at those positions
    D_a = [MASK] x (K + 1), a = 0 .. k        positions L+a .. L+a+K, cache in a scratch region

V is the verification: causal, over the exact causal cache below L-1 and itself. D_a is the
next draft *if* a drafts are accepted: it sees the causal prefix through L+a-1 (the cache and
the first a+1 rows of V) and itself bidirectionally, nothing else; its outputs at L+a .. L+a+K-1
give the drafts for L+a+1 .. L+a+K (token shift; the mask at L+a stands for the target's own
token at L+a, which is not known inside this forward). After the forward the verification
picks a; D_a's drafts become the next cycle's pending drafts and the other groups are dropped.
The groups' KV goes to scratch cache positions that no later forward reads, so the causal
cache holds exactly what plain speculative decoding would leave there.

Drafting against the causal KV of the prefix is not the block-causal KV the model was adapted
with, which costs acceptance (measured in docs/results/speculative_bench.md); it is what one
forward can offer without a second cache.
"""

from __future__ import annotations

import torch

from ..model.kv_cache import CacheAccess, KVCache
from ..model.transformer import Transformer
from .block_manager import NULL_PAGE
from .speculation import Speculation
from .speculation import draft_or_target_distribution as _distribution
from .verification import accept_greedy, accept_sampled

MAX_MERGED_DRAFT = 32  # the scratch region holds (K + 1)^2 positions per sequence


def merged_room(draft_length: int) -> int:
    """Scratch positions a sequence needs past its own: one group per possible outcome."""
    return (draft_length + 1) ** 2


def merged_layout(L: int, k: int, K: int, target_done: int, scratch: int):
    """One row's layout (pure). Returns (rope positions (T,), cache positions (T,), key limits:
    prefix_limit (T,) = keys below this index are visible, group (T,) = the row's own scratch
    group [lo, hi) also visible (lo = hi = 0 for V rows), logit indices (k+1 + (k+1)K,)).
    The row first repeats the tokens [target_done, L-1) not yet in the cache (the prompt, on the
    first cycle), then V, then the groups."""
    head = L - 1 - target_done  # prompt tokens to prefill before x_{L-1}
    v_pos = torch.arange(target_done, L + k)  # (head + k + 1,)
    g = K + 1
    a = torch.arange(k + 1)[:, None]  # (k+1, 1)
    j = torch.arange(g)[None, :]  # (1, K+1)
    g_pos = (L + a + j).flatten()
    g_cache = (scratch + a * g + j).flatten()
    rope = torch.cat([v_pos, g_pos])
    cache = torch.cat([v_pos, g_cache])
    prefix = torch.cat([v_pos + 1, (L + a).expand(-1, g).flatten()])
    lo = torch.cat([torch.zeros_like(v_pos), (scratch + a * g).expand(-1, g).flatten()])
    hi = torch.cat([torch.zeros_like(v_pos), (scratch + (a + 1) * g).expand(-1, g).flatten()])
    n_v = head + k + 1
    v_logits = torch.arange(head, n_v)
    g_logits = (n_v + a * g + torch.arange(K)[None, :]).flatten()
    return rope, cache, prefix, lo, hi, torch.cat([v_logits, g_logits])


def merged_forward(model: Transformer, cache: KVCache, page_size: int, mask_token_id: int,
                   seqs: list[Speculation]) -> list[tuple]:
    """One forward of `model` for every sequence in merged self-speculative mode, and each
    one's outcome (for `merged_apply`); each one's draft groups' KV goes to its scratch
    positions (`seq.scratch` on, pages of its table). The rows' inputs and per-query key limits
    go to the device as one tensor; the masks are built there from the limits (keys
    `j < prefix` or `lo <= j < hi`). Running it again for the same sequences rewrites the same
    cache positions with the same values (the engine's retry of a failed batch)."""
    dev = next(model.parameters()).device
    layouts = [merged_layout(s.length, s.k, s.params.draft_length, s.target_done, s.scratch) for s in seqs]
    n, width = len(seqs), max(lay[0].shape[0] for lay in layouts)
    pages = max(len(s.target_table) for s in seqs)
    key_len = pages * page_size
    n_logits = max(lay[5].shape[0] for lay in layouts)
    parts = [[] for _ in range(8)]  # ids rope writes prefix lo hi logit_idx tables, each (n, ...)
    for s, (r, c, prefix, lo, hi, li) in zip(seqs, layouts):
        pad = width - r.shape[0]
        L, k = s.length, s.k
        row = torch.full((width,), s.mask_id, dtype=torch.long)
        row[: L + k - s.target_done] = torch.tensor(s.tokens[s.target_done: L + k], dtype=torch.long)
        table = torch.tensor(s.target_table + [NULL_PAGE] * (pages - len(s.target_table)))
        zeros = torch.zeros(pad, dtype=torch.long)
        # cache position -> pool index; padding writes go to the null page, and padding queries
        # see key 0 only, so their softmax stays finite
        writes = torch.cat([table[c // page_size] * page_size + c % page_size, zeros + NULL_PAGE * page_size])
        for part, x in zip(parts, (row, torch.cat([r, zeros]), writes, torch.cat([prefix, zeros + 1]),
                                   torch.cat([lo, zeros]), torch.cat([hi, zeros]),
                                   torch.cat([li, li[-1:].expand(n_logits - li.shape[0])]), table)):
            part.append(x)
    flat = torch.cat([torch.stack(part).flatten() for part in parts]).to(dev, non_blocking=True)
    ids, rope, writes, prefix, lo, hi, logit_idx, tables = flat.split([n * width] * 6 + [n * n_logits, n * pages])
    keys = torch.arange(key_len, device=dev)
    limit = lambda x: x.view(n, width, 1)  # noqa: E731
    mask = (keys < limit(prefix)) | ((keys >= limit(lo)) & (keys < limit(hi)))  # (n, W, key_len)
    access = CacheAccess(cache, tables.view(n, pages), writes.view(n, width), key_len)
    with torch.inference_mode():
        logits = model(ids.view(n, width), rope.view(n, width), mask[:, None], access,
                       logits_slice=logit_idx.view(n, n_logits))  # (n, n_logits, V)
    return _outcomes(seqs, logits, mask_token_id)


def merged_apply(s: Speculation, outcome: tuple) -> None:
    """One sequence's part of a merged forward: its verification, then its next drafts."""
    accepted, nxt, drafts, q = outcome
    s.apply_verify(accepted, nxt)
    if not s.finished:
        s.set_pending(drafts, q)


def _outcomes(seqs: list[Speculation], logits: torch.Tensor, mask_token_id: int) -> list[tuple]:
    """Verify every row's pending drafts and take the next drafts from the group of its outcome:
    per row (accepted, the target's token, the next drafts, their distributions when sampling).
    One transfer brings back every row's outcome and, for greedy rows, the drafts of every
    outcome's group, picked on the device; a sampled row draws its next drafts once its
    outcome is known (one more transfer for it)."""
    dev, (n, n_logits) = logits.device, logits.shape[:2]
    ks = [s.k for s in seqs]
    Ks = [s.params.draft_length for s in seqs]
    k, K = max(ks), max(Ks)
    # a draft is never [MASK]: suppressed at every group place (the verification's places keep
    # the target's own distribution)
    groups = [[j > ks[i] for j in range(n_logits)] for i in range(n)]
    # host -> device, one copy: the drafts, the places of the target's tokens, the drafts' lengths,
    # the groups' places, each group's first place and draft length
    drafts = [t for s in seqs for t in s.tokens[s.length:s.length + s.k] + [0] * (k - s.k)]
    places = [min(j, ki) for ki in ks for j in range(k + 1)]
    flat = torch.tensor(drafts + places + ks + sum(groups, []) + [ki + 1 for ki in ks] + Ks,
                        dtype=torch.long).to(dev, non_blocking=True)
    drafts_t, places_t, ks_t, groups_t, first_t, Ks_t = flat.split(
        [n * k, n * (k + 1), n, n * n_logits, n, n])
    logits[..., mask_token_id].masked_fill_(groups_t.view(n, n_logits).bool(), float("-inf"))
    argmax = logits.argmax(-1)  # (n, n_logits)
    accepted, nxt = accept_greedy(drafts_t.view(n, k), argmax.gather(1, places_t.view(n, k + 1)), ks_t)
    if not all(s.params.greedy for s in seqs):
        rows = [(accepted[i], nxt[i]) if s.params.greedy else
                accept_sampled(torch.tensor(s.tokens[s.length:s.length + s.k], device=dev), s.q,
                               _distribution(logits[i, : s.k + 1], s.params), s.generator)
                for i, s in enumerate(seqs)]
        accepted, nxt = (torch.stack(x) for x in zip(*rows))
    # greedy rows' next drafts: the group of their outcome, row i's places
    # first_i + accepted_i K_i + j (j < K_i)
    cols = first_t[:, None] + accepted[:, None] * Ks_t[:, None] + torch.arange(K, device=dev).clamp_max(Ks_t[:, None] - 1)
    next_drafts = argmax.gather(1, cols.clamp_max(n_logits - 1))  # (n, K)
    out = torch.cat([accepted, nxt, next_drafts.flatten()]).tolist()  # the one transfer
    results = []
    for i, s in enumerate(seqs):
        done = s.length + out[i] + 1  # tokens known once this row's outcome is applied
        m = max(0, min(Ks[i], s.limit - 1 - done))
        if s.params.greedy:
            results.append((out[i], out[n + i], out[2 * n + i * K: 2 * n + i * K + m], None))
            continue
        a = ks[i] + 1 + out[i] * Ks[i]
        q = _distribution(logits[i, a:a + m], s.params)
        drawn = torch.multinomial(q, 1, generator=s.generator)[:, 0].tolist() if m else []
        results.append((out[i], out[n + i], drawn, q))
    return results
