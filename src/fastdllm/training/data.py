"""Training data: JSONL records rendered to token ids and a per-token loss mask.

Each line is one JSON object in one of three forms (other keys, e.g. an id, are ignored):

- `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with the tokenizer's chat
  template; the loss covers every assistant turn, including the template's end-of-turn tokens
  (so the model learns to stop), and nothing else.
- `{"prompt": ..., "response": ...}`: with a chat template, rendered as one user turn and one
  assistant turn (exactly as `messages` would be, so a chat model is adapted in the format it
  is served in); without one, `prompt` tokens (with the tokenizer's BOS) followed by `response`
  tokens and EOS, with no separator added (put spaces or newlines in the strings). The loss
  covers the response (and EOS).
- `{"text": ...}`: the tokenizer's special tokens (BOS) + text + EOS; every token bears loss.

Assistant spans are found by rendering the conversation prefix up to each assistant turn with
`add_generation_prompt=True` and up to its end: the span is the tokens between the two prefix
lengths, compared token by token with the full rendering (robust to templates such as Qwen3's
that render earlier turns differently from the final one).

Rendering and tokenizing costs milliseconds per example (three template renders and
tokenizations per chat turn), so a large file is split over `workers` processes, and with a
`cache_dir` the tokenized examples are stored once per (file content, tokenizer, EOS id) and
read back by every later run on the same data (`data.cache_dir`, `data.num_workers`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import jsonl
from ..atomic import atomic_write_bytes
from ..errors import FastDLLMError

RECORD_FORMS = '{"messages": [...]}, {"prompt": ..., "response": ...} or {"text": ...}'


@dataclass(frozen=True)
class Example:
    tokens: tuple[int, ...]
    loss_mask: tuple[bool, ...]  # True: a token the objective learns (never a prompt token)
    source: str  # "file:line", for messages about this example


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; malformed lines name file and line."""
    return jsonl.read_jsonl(path, expected=RECORD_FORMS,
                            missing_hint="check data.train_file / data.val_file")


def _ids(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _render(tokenizer, messages: list[dict], where: str, **kw) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    except Exception as e:  # jinja errors: roles out of order, missing fields, ...
        raise FastDLLMError(f"{where}: the chat template could not render this conversation "
                            f"({type(e).__name__}: {e})") from None
    return _ids(tokenizer, text, special=False)


def render_messages(tokenizer, messages, where: str) -> tuple[list[int], list[bool]]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise FastDLLMError(f"{where}: 'messages' must be a non-empty list of "
                            '{"role": str, "content": str} objects')
    if not tokenizer.chat_template:
        raise FastDLLMError(f"{where}: the tokenizer has no chat template, so 'messages' cannot be "
                            "rendered; use prompt/response or text records, or a chat tokenizer")
    full = _render(tokenizer, messages, where)
    loss = [False] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _common_prefix(_render(tokenizer, messages[:i], where, add_generation_prompt=True), full)
        # the last turn ends where the conversation does: no second rendering of the same text
        end = len(full) if i + 1 == len(messages) else _common_prefix(
            _render(tokenizer, messages[: i + 1], where), full)
        for j in range(start, end):
            loss[j] = True
    return full, loss


def render_record(record: dict, tokenizer, eos_id: int | None, where: str) -> tuple[list[int], list[bool]]:
    forms = [k for k in ("messages", "prompt", "text") if k in record]
    if len(forms) != 1 or ("prompt" in record) != ("response" in record):
        raise FastDLLMError(f"{where}: a record must have exactly one of {RECORD_FORMS}; "
                            f"got keys {sorted(record)}")
    if forms[0] == "messages":
        return render_messages(tokenizer, record["messages"], where)
    strings = [record[k] for k in (("prompt", "response") if forms[0] == "prompt" else ("text",))]
    if not all(isinstance(s, str) for s in strings):
        raise FastDLLMError(f"{where}: {' and '.join(repr(k) for k in record if k in ('prompt', 'response', 'text'))} "
                            "must be strings")
    if forms[0] == "prompt" and tokenizer.chat_template:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]}]
        return render_messages(tokenizer, messages, where)
    if eos_id is None:
        raise FastDLLMError("the tokenizer defines no EOS token, needed to end prompt/response and "
                            "text examples; set eos_token in tokenizer_config.json")
    if forms[0] == "prompt":
        prompt = _ids(tokenizer, record["prompt"], special=True)
        response = _ids(tokenizer, record["response"], special=False) + [eos_id]
        return prompt + response, [False] * len(prompt) + [True] * len(response)
    tokens = _ids(tokenizer, record["text"], special=True) + [eos_id]
    return tokens, [True] * len(tokens)


def _render_records(args: tuple) -> tuple[list[Example], int]:
    records, path, tokenizer, eos_id = args
    examples, dropped = [], 0
    for number, record in records:
        where = f"{path}:{number}"
        tokens, loss = render_record(record, tokenizer, eos_id, where)
        if not any(loss):
            dropped += 1
            continue
        examples.append(Example(tuple(tokens), tuple(loss), where))
    return examples, dropped


def _cache_file(path: Path, tokenizer, eos_id: int | None, cache_dir: Path) -> Path:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(repr((tokenizer.chat_template, eos_id, tokenizer.bos_token_id)).encode())
    return cache_dir / f"{path.stem}-{h.hexdigest()[:20]}.safetensors"


def _write_cache(file: Path, examples: list[Example], dropped: int) -> None:
    from safetensors.torch import save

    lengths = torch.tensor([len(ex.tokens) for ex in examples], dtype=torch.long)
    tensors = {"tokens": torch.tensor([t for ex in examples for t in ex.tokens], dtype=torch.int64),
               "loss_mask": torch.tensor([m for ex in examples for m in ex.loss_mask], dtype=torch.bool),
               "lengths": lengths,
               "lines": torch.tensor([int(ex.source.rsplit(":", 1)[1]) for ex in examples], dtype=torch.long)}
    atomic_write_bytes(file, save(tensors, metadata={"dropped": str(dropped)}))


def _read_cache(file: Path, path: Path) -> tuple[list[Example], int]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        dropped = int(f.metadata()["dropped"])
        tokens, loss = f.get_tensor("tokens").tolist(), f.get_tensor("loss_mask").tolist()
        lengths, lines = f.get_tensor("lengths").tolist(), f.get_tensor("lines").tolist()
    examples, start = [], 0
    for n, line in zip(lengths, lines):
        examples.append(Example(tuple(tokens[start:start + n]), tuple(loss[start:start + n]), f"{path}:{line}"))
        start += n
    return examples, dropped


def load_examples(path: str | Path, tokenizer, eos_id: int | None, *, workers: int = 0,
                  cache_dir: str | Path | None = None) -> tuple[list[Example], int]:
    """Tokenized examples of a JSONL file, and how many records were dropped for bearing no
    loss (e.g. a conversation without an assistant turn). `workers` > 1 renders in that many
    processes; `cache_dir` stores the result keyed by the file's content and the tokenizer."""
    path = Path(path)
    cache = _cache_file(path, tokenizer, eos_id, Path(cache_dir)) if cache_dir and path.is_file() else None
    if cache is not None and cache.is_file():
        return _read_cache(cache, path)
    records = read_jsonl(path)
    if workers > 1 and len(records) >= 4 * workers:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        size = -(-len(records) // workers)
        chunks = [(records[i:i + size], path, tokenizer, eos_id) for i in range(0, len(records), size)]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_render_records, chunks))
        examples = [ex for part, _ in parts for ex in part]
        dropped = sum(d for _, d in parts)
    else:
        examples, dropped = _render_records((records, path, tokenizer, eos_id))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        _write_cache(cache, examples, dropped)
    return examples, dropped
