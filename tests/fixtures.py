"""Tiny real checkpoints on disk, written by transformers itself, for tests.

`make_checkpoint(dir, family)` builds a randomly initialised (fixed seed) Qwen2, Llama or Qwen3
causal LM with transformers, saves it with `save_pretrained` (safetensors) and adds a small
byte-level BPE tokenizer trained at test time with the `tokenizers` library. Variants cover the
layouts fastdllm must load: tied/untied embeddings, sharded weights, Llama-3 RoPE scaling, the
published-config RoPE spelling, no tokenizer files, and the official Fast_dLLM_v2 layout
(`model_type: Fast_dLLM_Qwen`, `bd_size`, `auto_map` to remote code that must never run).

Everything here is importable from tests (`from fixtures import ...`); `conftest.py` wraps
the common variants as session-scoped pytest fixtures.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO_ROOT = Path(__file__).resolve().parents[1]
STORIES260K = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"

FAMILIES = ("qwen2", "llama", "qwen3")
ENDOFTEXT, IM_START, IM_END, MASK_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "|<MASK>|"
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so that the scaling changes the frequencies that matter within 512 positions
    "original_max_position_embeddings": 64,
}
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# ChatML, but like many published templates it refuses roles it does not know
STRICT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The strict template, turned hostile by the first message's content (issue 11): a nested loop
# that would run for ever, and allocations of 10 GB and more
HOSTILE_TEMPLATE = (
    "{% if messages[0]['content'] == 'HOSTILE-LOOP' %}{% for i in range(100000) %}"
    "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
    "{% if messages[0]['content'] == 'HOSTILE-ALLOC' %}{{ 'x' * 10**10 }}{% endif %}"
    "{% if messages[0]['content'] == 'HOSTILE-PAD' %}{{ 'x'|center(10**10) }}{% endif %}"
    "{% if messages[0]['content'] == 'HOSTILE-RECURSE' %}{% macro f(n) %}{{ f(n + 1) }}"
    "{% endmacro %}{{ f(0) }}{% endif %}"
    + STRICT_TEMPLATE
)


def set_chat_template(model_dir: str | Path, template: str) -> None:
    path = Path(model_dir) / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": template}))
    (Path(model_dir) / "chat_template.jinja").unlink(missing_ok=True)


# Written by the official layout's remote code if anything ever imports it.
REMOTE_CODE_SENTINEL = "REMOTE_CODE_RAN"

_CORPUS = [
    "Once upon a time there was a little girl named Lily.",
    "She liked to play outside in the sun with her dog.",
    "One day, Lily found a big red ball in the park.",
    "The answer is 42. What is two plus two? Two plus two is four.",
    "Hello! How can I help you today? Please write a short story.",
]
_BPE_SIZE = 320  # 3 specials + 256 byte symbols + merges; |<MASK>| is added after training


@functools.lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """The serialized test tokenizer: byte-level BPE (any text encodes), specials
    <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2, and the added special token |<MASK>|."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_SIZE,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tok.add_special_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)])
    return tok.to_str()


@functools.lru_cache(maxsize=1)
def special_token_ids() -> dict[str, int]:
    """Ids of the test tokenizer's special tokens: keys 'endoftext', 'im_start', 'im_end', 'mask'."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json())
    names = {"endoftext": ENDOFTEXT, "im_start": IM_START, "im_end": IM_END, "mask": MASK_TOKEN}
    return {key: tok.token_to_id(token) for key, token in names.items()}


def tokenizer_size() -> int:
    return max(special_token_ids().values()) + 1


def default_vocab_size() -> int:
    """The tokenizer size padded up to a multiple of 64 (as real checkpoints pad theirs)."""
    return -(-tokenizer_size() // 64) * 64


def write_tokenizer(model_dir: str | Path, *, eos_token: str = IM_END) -> None:
    """tokenizer.json + tokenizer_config.json that `AutoTokenizer.from_pretrained` loads."""
    model_dir = Path(model_dir)
    (model_dir / "tokenizer.json").write_text(tokenizer_json())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos_token,
        "pad_token": ENDOFTEXT,
        "bos_token": None,
        "unk_token": None,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def hf_config(family: str, *, vocab_size: int, tie: bool, num_layers: int = 2,
              rope_scaling: dict[str, Any] | None = None, rope_theta: float = 10000.0):
    """A transformers config object for one of the tiny test models (GQA: 4 heads, 2 kv heads)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    classes = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config}
    if family not in classes:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    ids = special_token_ids()
    return classes[family](
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        # 5x the usual 0.02, so logits are peaked enough that greedy decoding has clear winners
        initializer_range=0.1,
        rope_parameters={"rope_theta": rope_theta, "rope_type": "default", **(rope_scaling or {})},
        tie_word_embeddings=tie,
        bos_token_id=ids["endoftext"],
        eos_token_id=ids["im_end"],
        pad_token_id=ids["endoftext"],
        use_sliding_window=False,
    )


def _shape_random_init(model, lm_head_scale: float) -> None:
    """transformers initialises biases to 0 and norm weights to 1; give them random values too,
    so the parity tests also check that biases and norm weights load into the right places.
    Scaling the output embedding makes the next-token distributions peaked (logit std ~3 at
    scale 4: median top probability ~0.3, a few positions above 0.9), as in a trained model,
    so greedy choices are not near-ties and confidence thresholds are sometimes met."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)
            elif name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
        model.get_output_embeddings().weight.mul_(lm_head_scale)  # tied: the shared matrix, once


def make_checkpoint(
    model_dir: str | Path,
    family: str = "qwen2",
    *,
    vocab_size: int | None = None,
    tie: bool = False,
    sharded: bool = False,
    official_layout: bool = False,
    with_tokenizer: bool = True,
    rope_scaling: dict[str, Any] | None = None,
    seed: int = 0,
    num_layers: int = 2,
    bd_size: int | None = 32,
    mask_token_id: int | None = None,
    legacy_rope: bool = False,
    rope_theta: float = 10000.0,
    lm_head_scale: float = 4.0,
) -> Path:
    """Write a tiny random checkpoint of `family` ('qwen2', 'llama' or 'qwen3') to `model_dir`.

    vocab_size: defaults to `default_vocab_size()` (>= the tokenizer's size).
    sharded: weights split over several files with model.safetensors.index.json.
    official_layout: the published Fast_dLLM_v2 layout (qwen2 only): config.json with
        model_type Fast_dLLM_Qwen, `bd_size`, `auto_map` to modeling.py/configuration.py in the
        directory whose code writes `REMOTE_CODE_SENTINEL` and raises if ever imported; RoPE in
        the published top-level `rope_theta` spelling; no mask_token_id (the tokenizer's
        |<MASK>| is the mask).
    rope_scaling: e.g. `LLAMA3_ROPE`.
    bd_size: written to config.json (a checkpoint adapted for block diffusion, as the random
        weights stand for in the diffusion tests); None: a plain AR checkpoint, which
        refuses diffusion decoding (`LLM.is_adapted`).
    mask_token_id: written to config.json when given.
    lm_head_scale: multiplies the output embedding (see `_shape_random_init`).
    legacy_rope: rewrite RoPE as top-level `rope_theta` + `rope_scaling` (transformers 4.x and
        published Qwen2.5 / Llama-3 configs) instead of transformers 5's `rope_parameters`.
    Returns the directory. The same arguments always give the same weights.
    """
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

    if official_layout and family != "qwen2":
        raise ValueError("the official Fast_dLLM_v2 layout is a Qwen2 checkpoint")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = vocab_size or default_vocab_size()
    config = hf_config(family, vocab_size=vocab_size, tie=tie, num_layers=num_layers,
                       rope_scaling=rope_scaling, rope_theta=rope_theta)
    model_cls = {"qwen2": Qwen2ForCausalLM, "llama": LlamaForCausalLM, "qwen3": Qwen3ForCausalLM}[family]
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _shape_random_init(model, lm_head_scale)
    # ~100 KB shards split even these tiny models into several files
    model.save_pretrained(str(model_dir), max_shard_size="100KB" if sharded else "50GB")

    ids = special_token_ids()
    (model_dir / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["endoftext"],
        "eos_token_id": [ids["im_end"], ids["endoftext"]],
    }, indent=2) + "\n")
    if with_tokenizer:
        write_tokenizer(model_dir)

    if legacy_rope or official_layout:
        _rewrite_rope_legacy(model_dir)
    if official_layout:
        _make_official_layout(model_dir, bd_size)
    elif bd_size is not None:
        update_config(model_dir, bd_size=bd_size)
    if mask_token_id is not None:
        update_config(model_dir, mask_token_id=mask_token_id)
    return model_dir


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())


def update_config(model_dir: str | Path, remove: tuple[str, ...] = (), **updates: Any) -> dict[str, Any]:
    """Edit config.json in place: set `updates`, delete the keys in `remove`."""
    cfg = read_config_json(model_dir)
    cfg.update(updates)
    for key in remove:
        cfg.pop(key, None)
    (Path(model_dir) / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def _rewrite_rope_legacy(model_dir: Path) -> None:
    cfg = read_config_json(model_dir)
    params = dict(cfg.pop("rope_parameters"))
    theta = params.pop("rope_theta")
    scaling = params if params.get("rope_type", "default") != "default" else None
    update_config(model_dir, rope_theta=theta, rope_scaling=scaling, remove=("rope_parameters",))


_REMOTE_CODE = f"""\
# Stand-in for the remote code a published checkpoint ships: fastdllm must never import it.
from pathlib import Path

Path(__file__).with_name({REMOTE_CODE_SENTINEL!r}).write_text("remote code was executed")
raise RuntimeError("remote code from auto_map was executed")
"""


def _make_official_layout(model_dir: Path, bd_size: int) -> None:
    update_config(
        model_dir,
        architectures=["Fast_dLLM_QwenForCausalLM"],
        model_type="Fast_dLLM_Qwen",
        bd_size=bd_size,
        auto_map={
            "AutoConfig": "configuration.Fast_dLLM_QwenConfig",
            "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM",
        },
        remove=("mask_token_id",),
    )
    (model_dir / "modeling.py").write_text(_REMOTE_CODE)
    (model_dir / "configuration.py").write_text(_REMOTE_CODE)


def remote_code_ran(model_dir: str | Path) -> bool:
    return (Path(model_dir) / REMOTE_CODE_SENTINEL).exists()


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """A private copy of a (session-shared) checkpoint, for tests that edit files."""
    return Path(shutil.copytree(src, dst))


def load_hf_model(model_dir: str | Path, family: str):
    """The transformers reference model for a checkpoint dir (fp32, eager attention)."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

    model_cls = {"qwen2": Qwen2ForCausalLM, "llama": LlamaForCausalLM, "qwen3": Qwen3ForCausalLM}[family]
    return model_cls.from_pretrained(str(model_dir), dtype=torch.float32,
                                     attn_implementation="eager").eval()


BAD_REQUESTS = Path(__file__).resolve().parent / "data" / "bad_requests.jsonl"


def bad_requests() -> list[dict[str, Any]]:
    """The bad-request corpus (tests/data/bad_requests.jsonl), each entry with its raw body in
    "content" (bytes): "body" is sent as JSON, "raw" as UTF-8 text, "raw_hex" as bytes, and
    "repeat" {"marker", "text", "times"[, "close"]} expands the marker into text x times (and
    a second marker into close x times), which keeps huge inputs small on disk."""
    out = []
    for line in BAD_REQUESTS.read_text().splitlines():
        case = json.loads(line)
        if "body" in case:
            content = json.dumps(case["body"]).encode()
        elif "raw_hex" in case:
            content = bytes.fromhex(case["raw_hex"])
        else:
            text = case["raw"]
            rep = case.get("repeat")
            if rep:
                head, _, tail = text.partition(rep["marker"])
                if "close" in rep:
                    middle, _, tail = tail.partition(rep["marker"])
                    tail = middle + rep["close"] * rep["times"] + tail
                text = head + rep["text"] * rep["times"] + tail
            content = text.encode("utf-8", "surrogatepass")
        out.append({**case, "content": content})
    return out


# ---------------------------------------------------------------- host reads
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item",
            "is_nonzero", "equal"}


class CountSyncs(TorchDispatchMode):
    """Counts ops that need the device's data on the host (a host sync on a GPU): scalar reads
    (item/bool/int/float), data-dependent shapes (nonzero, boolean masks, unique), and, through
    the wrapped Tensor methods, tolist/numpy/cpu copies."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.count += 1
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                   for i in (args[1] if len(args) > 1 else [])):
            self.count += 1
        return func(*args, **(kwargs or {}))
