"""The decoder: one implementation for the Llama family (Llama, Qwen2/2.5, Qwen3, Fast-dLLM v2).

Architecture differences are flags on `ModelConfig` (q/k/v bias, per-head q/k RMSNorm, tied
embeddings, RoPE scaling), never branches on model names. Module and parameter names mirror
Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...) so checkpoints load by name.

The forward takes explicit attention metadata: a boolean mask (True = may attend) and,
optionally, a `CacheAccess` saying where to write this chunk's KV and how much of the cache to
read. The same forward serves AR decoding, block-diffusion decoding (paper §3.3), the
uncached reference and training (paper §3.2); only the mask and the cache access differ.
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
        # normalise in float32, scale in the input dtype (as the reference implementations do)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, cache: CacheAccess | None):
        n, t, _ = x.shape
        q = self.q_proj(x).view(n, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (n, heads, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.write_and_read(self.layer, k, v)  # (n, kv_heads, key_len, hd)
        gqa = self.num_kv_heads != self.num_heads
        if mask is None or isinstance(mask, torch.Tensor):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        elif isinstance(mask, TileKeys):  # block-sparse training attention (CPU path)
            out = tile_attention(q, k, v, mask)
        else:  # a flex_attention BlockMask (CUDA training path)
            from torch.nn.attention.flex_attention import flex_attention

            out = flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(n, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
        self._rope_len = 0
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def rope_for(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos/sin (n, 1, T, head_dim) for position ids (n, T); tables are built once and grown
        only when a longer position is seen."""
        need = int(positions.max()) + 1
        if need > self._rope_len:
            size = max(need, self.config.max_position_embeddings)
            cos, sin = rope_tables(self.config.rope, self.config.head_dim, size)
            self.rope_cos, self.rope_sin = cos.to(positions.device), sin.to(positions.device)
            self._rope_len = size
        cos = self.rope_cos[positions].to(dtype)[:, None]
        sin = self.rope_sin[positions].to(dtype)[:, None]
        return cos, sin

    def forward(
        self,
        input_ids: torch.Tensor,  # (n, T)
        positions: torch.Tensor,  # (n, T)
        mask,  # (n or 1, 1, T, key_len) bool tensor (True = may attend), a flex BlockMask, or TileKeys
        cache: CacheAccess | None = None,
        logits_slice: slice | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (n, K, vocab) for the chunk positions picked by `logits_slice`: a slice, or a
        long tensor (n, K) of chunk-relative indices per row; all positions by default.
        With `mask=None` the attention is plain causal over this chunk (no cache)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope_for(positions, x.dtype)
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
