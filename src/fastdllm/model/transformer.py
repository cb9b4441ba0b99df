"""The decoder: one implementation for the Llama family (Llama, Qwen2/2.5, Qwen3, Fast-dLLM v2).

Architecture differences are flags on `ModelConfig` (q/k/v bias, per-head q/k RMSNorm, tied
embeddings, RoPE scaling), never branches on model names.

Weights are fused in memory: q/k/v are one `qkv_proj` and gate/up one `gate_up_proj`, so a
layer runs two matrix products where the checkpoint names five. On disk the names stay
Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...): `hf_tensors` splits the fused
matrices into row views for export and `hf_targets` says where each named tensor loads to, so a
load followed by an export writes the same bytes.

The forward takes explicit attention metadata: a boolean mask (True = may attend) and,
optionally, a `CacheAccess` saying where to write this chunk's KV, how much of the cache to
read and (for a step that packs rows of different widths) how tokens map to query rows. The
same forward serves AR decoding, block-diffusion decoding (paper §3.3), the uncached reference
and training (paper §3.2); only the mask and the cache access differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .kv_cache import CacheAccess
from .rope import apply_rope, rope_tables
from .tile_attention import TileKeys, tile_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel, bit-identical to the formula below in fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # normalise in float32, scale in the input dtype (as the reference implementations do)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sizes = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                      cfg.num_kv_heads * cfg.head_dim)
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.sizes), bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, cache: CacheAccess | None):
        N, T, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(x, self.qkv_proj.weight, self.qkv_proj.bias).view(N, T, H + 2 * KV, hd)
        qk, v = qkv.split((H + KV, KV), dim=2)  # (N, T, heads, hd), token-major
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])), dim=2)
        qk = apply_rope(qk, cos, sin)  # q and k rotated together: one set of ops per layer
        q, k = qk.split((H, KV), dim=2)
        if cache is None:
            out = _attention(q, k.transpose(1, 2), v.transpose(1, 2), mask)
        elif cache.groups is None:
            cache.store(self.layer, k, v)
            out = _attention(q, *cache.read(self.layer, cache.tables, cache.key_len), mask)
        else:  # a packed step: x is (1, T); each group of equal-width rows attends on its own
            cache.store(self.layer, k, v)
            q = q.view(N * T, H, hd)
            outs = [_attention(q[g.start:g.start + g.rows * g.width].view(g.rows, g.width, H, hd),
                               *cache.read(self.layer, g.tables, g.key_len), g.mask)
                    for g in cache.groups]
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        out = out.view(N, T, H * hd)
        return F.linear(out, self.o_proj.weight, self.o_proj.bias)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """q (n, W, H, hd) token-major; k, v (n, KV, key_len, hd). Returns (n * W, H * hd),
    token-major."""
    n, W, H, hd = q.shape
    q = q.transpose(1, 2)  # (n, H, W, hd)
    gqa = k.shape[1] != H
    if mask is None or isinstance(mask, torch.Tensor):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    elif isinstance(mask, TileKeys):  # block-sparse training attention (CPU path)
        out = tile_attention(q, k, v, mask)
    else:  # a flex_attention BlockMask (CUDA training path)
        from torch.nn.attention.flex_attention import flex_attention

        out = flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(n * W, H * hd)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        gate_up = F.linear(x, self.gate_up_proj.weight, self.gate_up_proj.bias)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj.weight, self.down_proj.bias)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# fused module -> the Hugging Face modules it stands for, in row order
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


class Transformer(nn.Module):
    """A causal LM whose attention pattern is chosen by the caller."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, signed sin), (L, hd)

    # ------------------------------------------------------------------ rotary tables
    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin tables (length, head_dim) in the model's dtype on its device,
        built once and rebuilt only when a longer table, another device or dtype is asked for.
        Callers size them from host integers, so a forward never reads a position back."""
        emb = self.model.embed_tokens.weight
        t = self._rope
        if t is None or t[0].shape[0] < length or t[0].device != emb.device or t[0].dtype != emb.dtype:
            size = max(length, self.config.max_position_embeddings, t[0].shape[0] if t else 0)
            cos, sin = rope_tables(self.config.rope, self.config.head_dim, size)
            self._rope = (cos.to(emb.device, emb.dtype), sin.to(emb.device, emb.dtype))
        return self._rope

    def forward(
        self,
        input_ids: torch.Tensor,  # (N, T)
        positions: torch.Tensor,  # (N, T)
        mask,  # (n, 1, W, key_len) bool tensor (True = may attend), a flex BlockMask, or TileKeys
        cache: CacheAccess | None = None,
        logits_slice: slice | torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits (N, K, vocab) for the chunk positions picked by `logits_slice`: a slice, or a
        long tensor (N, K) of chunk-relative indices per row; all positions by default.
        With `mask=None` the attention is plain causal over this chunk (no cache).
        Without a cache, positions must be below max(max_position_embeddings, T); with one,
        below the cache length (the engine sizes the tables when it allocates the cache).
        `rope`: (cos, signed sin) tables to read instead of the model's: a captured step passes
        the ones it captured, which stay where they are when the model's tables grow."""
        x = self.model.embed_tokens(input_ids)
        length = input_ids.shape[1] if cache is None else cache.cache.positions
        cos_t, sin_t = rope if rope is not None else self.rope_tables(length)
        cos, sin = cos_t[positions].unsqueeze(-2), sin_t[positions].unsqueeze(-2)  # (N, T, 1, hd)
        if mask is None and cache is None:
            t = input_ids.shape[1]
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, None]
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if isinstance(logits_slice, torch.Tensor):
            x = x.gather(1, logits_slice[:, :, None].expand(-1, -1, x.shape[-1]))
        elif logits_slice is not None:
            x = x[:, logits_slice]
        return self.lm_head(self.model.norm(x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # ------------------------------------------------------------------ Hugging Face names
    def hf_targets(self) -> dict[str, tuple[nn.Parameter, slice]]:
        """Every tensor name of a Hugging Face checkpoint of this config -> (the parameter it
        loads into, the rows of that parameter it fills). Tied lm_head is left out."""
        out: dict[str, tuple[nn.Parameter, slice]] = {}
        for name, param in self.named_parameters():  # tied weights are listed once
            head, _, leaf = name.rpartition(".")  # e.g. model.layers.0.self_attn.qkv_proj, weight
            fused = next((f for f in FUSED if head.endswith(f)), None)
            if fused is None:
                out[name] = (param, slice(None))
                continue
            prefix = head[: -len(fused)]
            module = self.get_submodule(head.rpartition(".")[0])
            sizes = module.sizes if fused.startswith("self_attn") else (module.intermediate_size,) * 2
            start = 0
            for part, size in zip(FUSED[fused], sizes):
                out[f"{prefix}{part}.{leaf}"] = (param, slice(start, start + size))
                start += size
        return out

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """The weights under their Hugging Face names (row views of the fused matrices)."""
        return {name: param.detach()[rows] for name, (param, rows) in self.hf_targets().items()}
