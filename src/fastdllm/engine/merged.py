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


def merged_forward(model: Transformer, cache: KVCache, page_size: int,
                   seqs: list[Speculation]) -> torch.Tensor:
    """One forward of `model` for every sequence in merged self-speculative mode: logits
    (N, k+1 + (k+1)K, V) per row, for `merged_apply`; each one's draft groups' KV goes to its
    scratch positions (`seq.scratch` on, pages of its table). Running it again for the same
    sequences rewrites the same cache positions with the same values (the engine's retry)."""
    dev = next(model.parameters()).device
    layouts = [merged_layout(s.length, s.k, s.params.draft_length, s.target_done, s.scratch) for s in seqs]
    width = max(lay[0].shape[0] for lay in layouts)
    pages = max(len(s.target_table) for s in seqs)
    key_len = pages * page_size
    n_logits = max(lay[5].shape[0] for lay in layouts)
    ids, rope, writes, masks, logit_idx, tables = [], [], [], [], [], []
    keys = torch.arange(key_len)
    for s, (r, c, prefix, lo, hi, li) in zip(seqs, layouts):
        t = r.shape[0]
        pad = width - t
        L, k = s.length, s.k
        row = torch.full((width,), s.mask_id, dtype=torch.long)
        row[: L + k - s.target_done] = torch.tensor(s.tokens[s.target_done: L + k], dtype=torch.long)
        ids.append(row)
        rope.append(torch.cat([r, torch.zeros(pad, dtype=torch.long)]))
        table = torch.tensor(s.target_table + [NULL_PAGE] * (pages - len(s.target_table)))
        # cache position -> pool index; padding writes go to the null page
        writes.append(torch.cat([table[c // page_size] * page_size + c % page_size,
                                 torch.full((pad,), NULL_PAGE * page_size, dtype=torch.long)]))
        tables.append(table)
        m = (keys[None, :] < prefix[:, None]) | ((keys[None, :] >= lo[:, None]) & (keys[None, :] < hi[:, None]))
        masks.append(torch.cat([m, torch.zeros(pad, key_len, dtype=torch.bool)]) if pad else m)
        masks[-1][t:, 0] = True  # padding rows see one key, so softmax stays finite
        logit_idx.append(torch.cat([li, li[-1:].expand(n_logits - li.shape[0])]))
    access = CacheAccess(cache, torch.stack(tables).to(dev), torch.stack(writes).to(dev), key_len)
    with torch.inference_mode():
        return model(torch.stack(ids).to(dev), torch.stack(rope).to(dev),
                     torch.stack(masks)[:, None].to(dev), access,
                     logits_slice=torch.stack(logit_idx).to(dev))


def merged_apply(s: Speculation, logits: torch.Tensor, mask_token_id: int) -> None:
    """One sequence's part of a merged forward (its row of logits): verify, then keep the
    draft group of the outcome."""
    L, k, K = s.length, s.k, s.params.draft_length
    verify = logits[: k + 1]
    draft = s.tokens[L:L + k]
    if s.params.greedy:
        accepted, nxt = accept_greedy(draft, verify.argmax(-1).tolist())
    else:
        accepted, nxt = accept_sampled(torch.tensor(draft, device=verify.device), s.q,
                                       _distribution(verify, s.params), s.generator)
    s.apply_verify(accepted, nxt)
    if s.finished:
        return
    group = logits[k + 1 + accepted * K: k + 1 + (accepted + 1) * K].clone()
    group[:, mask_token_id] = float("-inf")  # a draft is never [MASK]
    m = max(0, min(K, s.limit - 1 - s.length))
    group = group[:m]
    if s.params.greedy:
        s.set_pending(group.argmax(-1).tolist(), None)
    else:
        q = _distribution(group, s.params)
        s.set_pending(torch.multinomial(q, 1, generator=s.generator)[:, 0].tolist() if m else [], q)
