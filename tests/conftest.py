"""Shared pytest fixtures: tiny checkpoints written once per session (see fixtures.py).

Session-scoped checkpoints are shared by every test: never edit them in place; take a private
copy with the `ckpt_copy` fixture first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from fixtures import (
    CountSyncs,
    HOSTILE_TEMPLATE,
    LLAMA3_ROPE,
    STORIES260K,
    copy_checkpoint,
    make_checkpoint,
    set_chat_template,
)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory) -> Callable[..., Path]:
    """`checkpoint_factory(family, **make_checkpoint_kwargs)` -> a directory, built once per
    distinct set of arguments in this session."""
    built: dict[tuple, Path] = {}

    def factory(family: str = "qwen2", **kwargs: Any) -> Path:
        key = (family, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in built:
            built[key] = make_checkpoint(tmp_path_factory.mktemp(f"ckpt-{family}"), family, **kwargs)
        return built[key]

    return factory


@pytest.fixture(scope="session")
def qwen2_ckpt(checkpoint_factory) -> Path:
    return checkpoint_factory("qwen2")


@pytest.fixture(scope="session")
def ar_ckpt(checkpoint_factory) -> Path:
    """`qwen2_ckpt`'s weights as a plain AR checkpoint: no bd_size, no mask_token_id in config.json
    (its tokenizer still holds |<MASK>|, as the shipped fastdllm-wp-ar's does)."""
    return checkpoint_factory("qwen2", bd_size=None)


@pytest.fixture(scope="session")
def qwen2_tied_ckpt(checkpoint_factory) -> Path:
    return checkpoint_factory("qwen2", tie=True)


@pytest.fixture(scope="session")
def llama_ckpt(checkpoint_factory) -> Path:
    return checkpoint_factory("llama")


@pytest.fixture(scope="session")
def llama3_rope_ckpt(checkpoint_factory) -> Path:
    return checkpoint_factory("llama", rope_scaling=LLAMA3_ROPE)


@pytest.fixture(scope="session")
def qwen3_ckpt(checkpoint_factory) -> Path:
    return checkpoint_factory("qwen3", num_layers=3)


@pytest.fixture(scope="session")
def sharded_ckpt(checkpoint_factory) -> Path:
    """Same weights as `qwen2_ckpt`, split over several safetensors shards."""
    return checkpoint_factory("qwen2", sharded=True)


@pytest.fixture(scope="session")
def official_ckpt(checkpoint_factory) -> Path:
    """The published Fast_dLLM_v2 layout (bd_size 32), same weights as `qwen2_ckpt`."""
    return checkpoint_factory("qwen2", official_layout=True)


@pytest.fixture(scope="session")
def no_tokenizer_ckpt(checkpoint_factory) -> Path:
    return checkpoint_factory("qwen2", with_tokenizer=False)


@pytest.fixture(scope="session")
def tiny_tokenizer(qwen2_ckpt):
    """The test tokenizer as transformers loads it (ChatML template, eos <|im_end|>, |<MASK>|)."""
    from fastdllm.model.checkpoint import load_tokenizer

    return load_tokenizer(qwen2_ckpt)


@pytest.fixture(scope="session")
def stories260k_dir() -> Path:
    """The real (tiny, trained) Llama checkpoint shipped in the shared folder."""
    if not (STORIES260K / "config.json").is_file():
        pytest.skip(f"real checkpoint not found at {STORIES260K}")
    return STORIES260K


@pytest.fixture
def ckpt_copy(tmp_path) -> Callable[[Path], Path]:
    """`ckpt_copy(src)` -> a private, editable copy of a checkpoint under this test's tmp_path."""
    counter = iter(range(1000))

    def copy(src: Path) -> Path:
        return copy_checkpoint(src, tmp_path / f"copy{next(counter)}-{Path(src).name}")

    return copy


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU the threads' waiting
    makes tests several times slower; a module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`; restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def hostile_template_ckpt(qwen2_ckpt, tmp_path_factory) -> Path:
    """The tiny Qwen2 with `HOSTILE_TEMPLATE`: strict about roles, hostile on trigger words."""
    ckpt = copy_checkpoint(qwen2_ckpt, tmp_path_factory.mktemp("hostile") / "ckpt")
    set_chat_template(ckpt, HOSTILE_TEMPLATE)
    return ckpt


@pytest.fixture(scope="session")
def strict_server(hostile_template_ckpt):
    """One server for every bad-request test (tests/test_server_errors.py and
    tests/test_fault_injection.py): default limits, 4 slots."""
    from fastdllm import LLM
    from fastdllm.server import BackgroundServer, ServerConfig

    llm = LLM.load(hostile_template_ckpt, device="cpu")
    config = ServerConfig(served_model_name="tiny", defaults=llm.decode_config(max_new_tokens=16),
                          max_batch=4)
    with BackgroundServer(llm, config) as srv:
        yield srv


@pytest.fixture
def count_syncs(monkeypatch):
    mode = CountSyncs()
    for method in ("tolist", "numpy", "cpu"):
        original = getattr(torch.Tensor, method)

        def wrapped(self, *a, _original=original, **k):
            mode.count += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, method, wrapped)
    return mode
