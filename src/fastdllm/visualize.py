"""An HTML replay of one generation's decoding (`fastdllm generate --visualize out.html`).

This module owns turning a `GenerationResult` and its step trace (see `engine/sequence.py`)
into one self-contained page: the prompt, then the generated positions laid out in their
Fast-dLLM v2 blocks and sub-blocks (paper §3.3), each a [MASK] chip until the step that
unmasked it, coloured by that step. A slider, play/pause and prev/next replay the steps;
`#step=N` in the URL opens the page at step N (for screenshots and links).

The page has no external references: CSS and JS are inline and the replay data is embedded
as JSON, so the file can be mailed or attached to an issue. The page's template, style sheet and
script are package data in `fastdllm/replay_page/` (real .html/.css/.js files that editors and
linters understand), inlined into each page when it is written.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import atomic_write_text
from .errors import FastDLLMError
from .rounding import round_down

if TYPE_CHECKING:
    from .llm import LLM, GenerationResult

# Newlines and tabs get an arrow; other control characters an escape (`\\x16`), since common
# monospace fonts lack the Unicode "control pictures".
_VISIBLE = {"\n": "\u21b5", "\t": "\u21e5", "\r": "\\r"}


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-level BPE alphabet (byte -> printable character)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def visible(text: str) -> str:
    """Text as a token chip shows it: newlines as ↵, tabs as ⇥, other control characters
    escaped, a whitespace-only token as ␣ per space, an empty one as ∅."""
    if text == "":
        return "\u2205"
    if text.strip(" ") == "":
        return "\u2423" * len(text)
    return "".join(_VISIBLE.get(c, f"\\x{ord(c):02x}" if ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 else c)
                   for c in text)


def _printable(text: str) -> str:
    """Running text with control characters other than newline and tab escaped."""
    return "".join(c if c in "\n\t" else visible(c) if ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 else c
                   for c in text)


def token_labels(tokenizer: Any, ids: list[int]) -> list[str]:
    """One display label per token id, each decoded alone. A byte-level BPE token that is only
    part of a UTF-8 character decodes to U+FFFD; it is shown by its bytes instead (`\\xe2`).
    Without a tokenizer (or for an id the tokenizer lacks) the label is `#id`."""
    if tokenizer is None:
        return [f"#{i}" for i in ids]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    labels = []
    for i, piece in zip(ids, pieces):
        if piece is None:
            labels.append(f"#{i}")
            continue
        text = tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if "\ufffd" in text:
            dec = _byte_decoder()
            text = (bytes(dec[c] for c in piece).decode("utf-8", errors="backslashreplace")
                    if all(c in dec for c in piece) else piece)
        labels.append(visible(text))
    return labels


def replay_data(llm: LLM, result: GenerationResult) -> dict[str, Any]:
    """Everything the page needs, as JSON-ready values. Positions are absolute."""
    if result.trace is None:
        raise FastDLLMError("the visualisation needs the step trace: generate with trace=True",
                            field="trace")
    p, tok = result.params, llm.tokenizer
    diffusion = p is not None and p.diffusion
    block = p.block if p is not None else 1
    start = result.prompt_tokens
    output_end = start + len(result.token_ids)
    end = max([output_end] + [x + 1 for step in result.trace for x in step["positions"]])
    prompt_ids = result.prompt_ids or []
    # in diffusion mode the first block may begin inside the prompt: show that tail in it
    first_block = round_down(start, block)
    tail_from = first_block if prompt_ids else start
    tail = prompt_ids[tail_from:]
    ids = sorted({t for step in result.trace for t in step["tokens"]} | set(tail))
    special = set(tok.all_special_ids) if tok is not None else set()
    special.add(llm.special.mask_token_id)
    if tok is not None and prompt_ids:
        prompt_text = tok.decode(prompt_ids[:tail_from], skip_special_tokens=False,
                                 clean_up_tokenization_spaces=False)
    else:
        prompt_text = " ".join(str(i) for i in prompt_ids[:tail_from])
    s = result.stats
    return {
        "title": llm.model_dir.name,
        "mode": s["mode"],
        "block_size": block,
        "sub_block_size": p.sub_block_size if diffusion else 1,
        "threshold": p.threshold if diffusion else None,
        "block_cache": p.block_cache if p is not None else None,
        "sub_block_cache": p.sub_block_cache if diffusion else None,
        "stats": {k: s[k] for k in ("forward_calls", "new_tokens", "tokens_per_forward",
                                    "tokens_per_second", "seconds")},
        "finish_reason": result.finish_reason,
        "prompt_tokens": start,
        "prompt_text": prompt_text,
        "prompt_tail": tail,
        "tail_from": tail_from,
        "first_block": first_block,
        "start": start,
        "output_end": output_end,
        "end": end,
        "labels": {str(i): label for i, label in zip(ids, token_labels(tok, ids))},
        "special": sorted(i for i in ids if i in special),
        "text": _printable(result.text) if result.text is not None
        else " ".join(map(str, result.token_ids)),
        "trace": result.trace,
    }


def _json_for_script(data: dict) -> str:
    """JSON that cannot end its <script> element early (`</script>`, `<!--`)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(data: dict[str, Any]) -> str:
    parts = {"TITLE": html.escape(f"fastdllm replay · {data['title']}"), "CSS": _asset("replay.css"),
             "JS": _asset("replay.js"), "DATA": _json_for_script(data)}
    # one pass, so text inside the parts is never taken for a placeholder
    return re.sub(r"__(TITLE|CSS|JS|DATA)__", lambda m: parts[m.group(1)], _asset("page.html"))


def _asset(name: str) -> str:
    """The page's template, style sheet and script ship as package data (fastdllm/replay_page)."""
    return resources.files("fastdllm").joinpath("replay_page", name).read_text(encoding="utf-8")


def write_html(path: str | os.PathLike, llm: LLM, result: GenerationResult) -> Path:
    """Write the replay page for `result` to `path` atomically (temp file + rename)."""
    path = Path(path)
    page = render_html(replay_data(llm, result))
    try:
        atomic_write_text(path, page)
    except OSError as e:
        raise FastDLLMError(f"cannot write the visualisation to {path}: {e.strerror}",
                            field="visualize") from None
    return path

