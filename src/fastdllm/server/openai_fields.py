"""Log-probabilities in OpenAI's two shapes, from what the engine and the scorer recorded.

A generated token's log-probability is the log of its confidence: its probability under the
distribution it was drawn from (after logit_bias, penalties, temperature, top-k and top-p), at
the step that decided it (engine/logit_processing.py). An echoed prompt token's is the exact
log-likelihood of the lm-eval model `fastdllm` (evaluation/loglikelihood.py); the first prompt
token has none (nothing predicts it), as in OpenAI's answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..engine.logit_processing import floor
from ..engine.sequence import Sequence
from ..evaluation.loglikelihood import Scores
from . import protocol as p


@dataclass(frozen=True)
class TokenInfo:
    id: int
    logprob: float | None  # None: the first prompt token
    top: tuple[tuple[int, float], ...]  # the most likely tokens at this place, best first


def generated(seq: Sequence, start: int, end: int) -> list[TokenInfo]:
    """The decoded tokens at positions [start, end) (final: the engine no longer changes them)."""
    return [TokenInfo(seq.tokens[i], floor(math.log(seq.token_probs[i])),
                      tuple(seq.token_alternatives.get(i, ())))
            for i in range(start, end)]


def prompt(ids: list[int], scores: Scores) -> list[TokenInfo]:
    out = [TokenInfo(ids[0], None, ())]
    for j, token in enumerate(ids[1:]):
        top = tuple((int(i), floor(float(v))) for i, v in zip(scores.top_ids[j], scores.top_logp[j]))
        out.append(TokenInfo(token, floor(float(scores.logp[j])), top))
    return out


def ids_to_spell(infos: list[TokenInfo]) -> list[int]:
    """Every token id the answer shows, each once (to be decoded in one go)."""
    return list(dict.fromkeys([t.id for t in infos] + [i for t in infos for i, _ in t.top]))


def completion_logprobs(infos: list[TokenInfo], spell: dict[int, str], k: int,
                        offset: int = 0) -> p.CompletionLogprobs:
    tokens = [spell[t.id] for t in infos]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    tops = [None if t.logprob is None else _merged(t.top[:k], spell) for t in infos]
    return p.CompletionLogprobs(tokens=tokens, token_logprobs=[t.logprob for t in infos],
                                top_logprobs=tops, text_offset=offsets)


def chat_logprobs(infos: list[TokenInfo], spell: dict[int, str], raw: dict[int, bytes],
                  k: int) -> p.ChatLogprobs:
    return p.ChatLogprobs(content=[
        p.TokenLogprob(token=spell[t.id], logprob=t.logprob, bytes=list(raw[t.id]),
                       top_logprobs=[p.TopLogprob(token=spell[i], logprob=v, bytes=list(raw[i]))
                                     for i, v in t.top[:k]])
        for t in infos])


def token_bytes(tokenizer, ids: list[int]) -> list[bytes]:
    """Each token's own bytes (a token may hold part of a character, which its decoded text
    shows as U+FFFD): byte-level BPE pieces mapped back through GPT-2's byte alphabet,
    SentencePiece byte pieces (<0x0A>) as that byte, otherwise the decoded text's UTF-8."""
    out = []
    for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        piece = piece or ""
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            out.append(bytes([int(piece[3:5], 16)]))
        elif piece and all(c in _BYTE_OF for c in piece) and i not in tokenizer.all_special_ids:
            out.append(bytes(_BYTE_OF[c] for c in piece))
        else:
            out.append(tokenizer.decode([i]).replace("\u2581", " ").encode())
    return out


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte, inverted (what byte-level BPE vocabularies use)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_alphabet()


def _merged(top, spell: dict[int, str]) -> dict[str, float]:
    """OpenAI's {token text: logprob}; two ids that read alike keep the likelier."""
    out: dict[str, float] = {}
    for i, v in top:
        out.setdefault(spell[i], v)
    return out
