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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import jsonl
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
        end = _common_prefix(_render(tokenizer, messages[: i + 1], where), full)
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


def load_examples(path: str | Path, tokenizer, eos_id: int | None) -> tuple[list[Example], int]:
    """Tokenized examples of a JSONL file, and how many records were dropped for bearing no
    loss (e.g. a conversation without an assistant turn)."""
    examples, dropped = [], 0
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        tokens, loss = render_record(record, tokenizer, eos_id, where)
        if not any(loss):
            dropped += 1
            continue
        examples.append(Example(tuple(tokens), tuple(loss), where))
    return examples, dropped
