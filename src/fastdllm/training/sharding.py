"""Sharded training (FSDP2, `torch.distributed.fsdp.fully_shard`): parameters, gradients and
AdamW state split over the processes, for bases whose full training state does not fit one
device (docs/training.md, "Sharded training").

Each decoder layer is one FSDP unit (its weights are gathered just before its forward and
freed after); the root unit holds the embeddings, the final norm and the head (tied weights
stay one parameter because both live in the root). Gradients are reduce-scattered as a mean
over processes, like DDP's all-reduce, so the trainer's loss scaling is unchanged.

Checkpoints stay the single-process format: the model and the optimizer state are gathered
into full (consolidated) state dicts on save, and every process loads the full state and keeps
its own shard on resume (re-sharded for whatever world size resumes). So a sharded run's
checkpoint resumes the same way as any other, and `final/` is an ordinary checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.transformer import Transformer


def shard_model(model: Transformer, compute_dtype: torch.dtype | None = None) -> Transformer:
    """Shard `model` in place over the default process group (one unit per decoder layer).

    `compute_dtype` (bf16 training): layers are gathered and run in that dtype, so the
    all-gathers move half the bytes and no per-op autocast copies of the weights are made;
    gradients are reduced in float32 and the shards, gradients and AdamW state stay float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) \
        if compute_dtype is not None else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model(model: Transformer) -> Transformer | None:
    """A plain CPU copy of a sharded model with the full weights, on the main process only
    (None elsewhere). Collective: every process must call it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options())  # empty except on rank 0
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = Transformer(model.config)
    plain.load_state_dict(state, assign=True)
    if model.config.tie_word_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    return plain


def _fqn_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Parameter names of each optimizer group, in group order (the names torch's state-dict
    helpers key a full optimizer state by)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The optimizer's full state in `optimizer.state_dict()`'s layout (parameters numbered in
    group order), on the main process only. Collective."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_options())
    if dist.get_rank() != 0:
        return None
    index, groups = {}, []
    for g in full["param_groups"]:
        ids = []
        for fqn in g["params"]:
            index[fqn] = len(index)
            ids.append(index[fqn])
        groups.append({**g, "params": ids})
    return {"state": {index[fqn]: s for fqn, s in full["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state (single-process layout) into a sharded model's optimizer;
    every process passes the same full state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    order = _fqn_order(model, optimizer)
    fqn_of = [fqn for group in order for fqn in group]
    groups = [{**saved, "params": fqns} for saved, fqns in zip(state["param_groups"], order)]
    by_fqn = {"state": {fqn_of[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=by_fqn, options=_options())


def clip_grad_norm(parameters, max_norm: float) -> float:
    """`clip_grad_norm_` over sharded gradients; the norm is of the full gradient."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
