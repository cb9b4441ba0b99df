"""An HTML replay of one generation's decoding (`fastdllm generate --visualize out.html`).

This module owns turning a `GenerationResult` and its step trace (see `engine/sequence.py`)
into one self-contained page: the prompt, then the generated positions laid out in their
Fast-dLLM v2 blocks and sub-blocks (paper §3.3), each a [MASK] chip until the step that
unmasked it, coloured by that step. A slider, play/pause and prev/next replay the steps;
`#step=N` in the URL opens the page at step N (for screenshots and links).

The page has no external references: CSS and JS are inline and the replay data is embedded
as JSON, so the file can be mailed or attached to an issue. The template lives here as
string constants rather than in package data so the module is the whole feature.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import atomic_write_text
from .errors import FastDLLMError

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
    block = p.block_size if diffusion else 1
    start = result.prompt_tokens
    output_end = start + len(result.token_ids)
    end = max([output_end] + [x + 1 for step in result.trace for x in step["positions"]])
    prompt_ids = result.prompt_ids or []
    # in diffusion mode the first block may begin inside the prompt: show that tail in it
    first_block = (start // block) * block
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
    parts = {"TITLE": html.escape(f"fastdllm replay · {data['title']}"), "CSS": _CSS, "JS": _JS,
             "DATA": _json_for_script(data)}
    # one pass, so text inside the parts is never taken for a placeholder
    return re.sub(r"__(TITLE|CSS|JS|DATA)__", lambda m: parts[m.group(1)], _PAGE)


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


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
<header>
  <h1>fastdllm <span class="muted">decoding replay</span> <span id="model"></span></h1>
  <div id="stats" class="stats"></div>
</header>
<section class="controls">
  <button id="prev" title="previous step (←)" aria-label="previous step">
    <svg viewBox="0 0 16 16"><path d="M3 3h2v10H3zM13 3v10L6 8z"/></svg></button>
  <button id="play" title="play / pause (space)" aria-label="play"></button>
  <button id="next" title="next step (→)" aria-label="next step">
    <svg viewBox="0 0 16 16"><path d="M11 3h2v10h-2zM3 3v10l7-5z"/></svg></button>
  <input id="slider" type="range" min="0" value="0" aria-label="step">
  <span id="steplabel" class="steplabel"></span>
</section>
<div id="stepinfo" class="stepinfo"></div>
<div id="bars" class="bars" aria-label="tokens unmasked per step"></div>
<section class="legend" id="legend"></section>
<section class="panel"><h2>Prompt <span class="muted" id="promptcount"></span></h2>
  <pre id="prompt" class="prompt"></pre></section>
<section id="blocks" class="blocks"></section>
<section class="panel"><h2>Final output text</h2><pre id="text" class="text"></pre></section>
<div id="tip" class="tip" hidden></div>
<noscript><p>This replay needs JavaScript.</p></noscript>
<script id="replay-data" type="application/json">__DATA__</script>
<script>__JS__</script>
</body>
</html>
"""

_CSS = """
:root { --fg:#1d2430; --muted:#6b7280; --line:#e3e6eb; --bg:#f6f7f9; --card:#fff; --accent:#2f6fed;
  --mono: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; }
* { box-sizing: border-box; }
body { margin: 0; padding: 20px 28px 40px; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
h1 { font-size: 20px; margin: 0 0 8px; font-weight: 650; }
h1 #model { font-size: 13px; font-weight: 500; color: var(--muted); margin-left: 6px;
  font-family: var(--mono); }
h2 { font-size: 12px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted);
  margin: 0 0 6px; font-weight: 600; }
.muted { color: var(--muted); font-weight: 400; }
.stats { display: flex; flex-wrap: wrap; gap: 6px; }
.stat { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 3px 9px; font-size: 12px; }
.stat b { font-weight: 650; font-variant-numeric: tabular-nums; }
.stat.mode { background: #1d2430; color: #fff; border-color: #1d2430; }
.controls { display: flex; align-items: center; gap: 8px; margin: 16px 0 6px; }
button { font-size: 15px; width: 38px; height: 32px; border-radius: 8px; border: 1px solid var(--line);
  background: var(--card); cursor: pointer; color: var(--fg); }
button:hover { border-color: var(--accent); }
button svg { width: 14px; height: 14px; fill: currentColor; vertical-align: middle; }
#play { background: var(--accent); color: #fff; border-color: var(--accent); }
#slider { flex: 1; accent-color: var(--accent); }
.steplabel { font-variant-numeric: tabular-nums; min-width: 110px; text-align: right; font-weight: 600; }
.stepinfo { color: var(--muted); min-height: 20px; font-size: 13px; }
.bars { display: flex; align-items: flex-end; gap: 2px; height: 44px; margin: 6px 0 12px;
  padding: 0 2px; border-bottom: 1px solid var(--line); }
.bar { flex: 1; min-width: 2px; max-width: 28px; border-radius: 3px 3px 0 0; cursor: pointer;
  opacity: .35; }
.bar.on { opacity: 1; }
.bar.cur { outline: 2px solid var(--fg); outline-offset: 1px; }
.legend { display: flex; flex-wrap: wrap; align-items: center; gap: 14px; margin-bottom: 14px;
  font-size: 12.5px; color: var(--muted); }
.scale { display: flex; align-items: center; gap: 6px; }
.grad { width: 220px; height: 12px; border-radius: 6px; }
.panel { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 10px 14px; margin-bottom: 14px; }
pre { margin: 0; white-space: pre-wrap; word-break: break-word; font-family: var(--mono);
  font-size: 12.5px; }
.prompt { max-height: 7.5em; overflow: auto; color: #444b57; }
.nl { color: #a0a7b3; }
.blocks { display: flex; flex-direction: column; gap: 10px; margin-bottom: 14px; }
.block { background: var(--card); border: 1px solid var(--line); border-left: 4px solid #9aa3b2;
  border-radius: 10px; padding: 8px 12px 10px; }
.block.active { border-left-color: var(--accent); box-shadow: 0 1px 6px rgba(47,111,237,.15); }
.bhead { font-size: 12px; color: var(--muted); margin-bottom: 6px; }
.bhead b { color: var(--fg); font-weight: 650; }
.subs { display: flex; flex-wrap: wrap; gap: 8px 10px; }
.sub { display: flex; flex-wrap: wrap; gap: 3px; padding: 5px 6px 4px; border: 1px dashed #cfd5de;
  border-radius: 7px; position: relative; }
.sub .slabel { position: absolute; top: -8px; left: 6px; font-size: 10px; background: var(--card);
  padding: 0 3px; color: #9aa3b2; line-height: 14px; }
.flow { display: flex; flex-wrap: wrap; gap: 3px; }
.tok { font-family: var(--mono); font-size: 12.5px; line-height: 20px; min-width: 22px; height: 24px;
  padding: 1px 5px 2px; border-radius: 5px; white-space: pre; text-align: center;
  border: 1px solid transparent; position: relative; cursor: default; transition: background .15s; }
.tok.mask { background: #eef0f3; color: #9aa3b2; border: 1px dashed #c3c9d3; font-size: 10.5px; }
.tok.prompt { background: #fff; color: #6b7280; border: 1px solid #d6dae1; }
.tok.special { font-style: italic; }
.tok.new { box-shadow: 0 0 0 2px #fff, 0 0 0 4px #ff4d6d; z-index: 1; }
.tok.dropped { opacity: .35; text-decoration: line-through; }
.tok .conf { position: absolute; left: 3px; bottom: 1px; height: 2px; border-radius: 1px;
  background: rgba(255,255,255,.85); }
.tok.light .conf { background: rgba(0,0,0,.45); }
.tip { position: fixed; z-index: 10; background: #1d2430; color: #fff; border-radius: 8px;
  padding: 8px 10px; font-size: 12.5px; pointer-events: none; max-width: 320px;
  box-shadow: 0 4px 16px rgba(0,0,0,.25); }
.tip .t { font-family: var(--mono); font-size: 15px; white-space: pre; }
.tip .k { color: #aab3c2; }
.text { max-height: 16em; overflow: auto; }
"""

_JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("replay-data").textContent);
const $ = (id) => document.getElementById(id);
const T = D.trace.length;
const STOPS = [[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];  // viridis
function color(step) {  // step: 0-based trace index
  const x = T > 1 ? 0.08 + 0.92 * step / (T - 1) : 0.5, i = Math.min(3, Math.floor(x * 4)), f = x * 4 - i;
  return STOPS[i].map((c, k) => Math.round(c + f * (STOPS[i + 1][k] - c)));
}
const css = (rgb) => `rgb(${rgb.join(",")})`;
const light = (rgb) => 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 150;
const label = (id) => D.labels[String(id)];
const isSpecial = new Set(D.special);
const diffusion = D.mode === "diffusion";

// position -> {step, token, conf, kind}
const decodedAt = new Map();
D.trace.forEach((s, i) => s.positions.forEach((p, j) =>
  decodedAt.set(p, {step: i, token: s.tokens[j], conf: s.confidences[j], kind: s.kind})));

function stat(k, v, cls) {
  const el = document.createElement("span");
  el.className = "stat" + (cls ? " " + cls : "");
  el.innerHTML = k ? `<span class="muted">${k}</span> <b></b>` : "<b></b>";
  el.querySelector("b").textContent = v;
  $("stats").appendChild(el);
}
$("model").textContent = D.title;
const S = D.stats;
stat("", D.mode, "mode");
if (diffusion) {
  stat("threshold", D.threshold);
  stat("block / sub-block", `${D.block_size} / ${D.sub_block_size}`);
  stat("caches", [D.block_cache ? "block" : null, D.sub_block_cache ? "sub-block" : null]
    .filter(Boolean).join(" + ") || "off");
}
stat("new tokens", S.new_tokens);
stat("forward calls", S.forward_calls);
stat("tokens / forward", S.tokens_per_forward.toFixed(2));
stat("tokens / s", S.tokens_per_second.toFixed(1));
stat("time", `${S.seconds.toFixed(3)} s`);
stat("finish", D.finish_reason);

// prompt: newlines shown as ↵ followed by a real line break
$("promptcount").textContent = `· ${D.prompt_tokens} tokens`;
D.prompt_text.split("\n").forEach((line, i) => {
  if (i) { const nl = document.createElement("span"); nl.className = "nl"; nl.textContent = "↵\n";
    $("prompt").appendChild(nl); }
  $("prompt").appendChild(document.createTextNode(line));
});
if (!D.prompt_text) $("prompt").textContent = D.prompt_tail.length ? "(all in the first block below)" : "";
$("text").textContent = D.text;

// blocks / sub-blocks of chips
const chips = new Map();
function chip(pos) {
  const el = document.createElement("span");
  el.className = "tok";
  el.dataset.pos = pos;
  chips.set(pos, el);
  return el;
}
function fillRange(parent, from, to) {
  for (let p = from; p < to; p++) {
    const el = chip(p);
    if (p < D.start) {
      const id = D.prompt_tail[p - D.tail_from];
      el.className = "tok prompt"; el.textContent = label(id); el.dataset.id = id;
    }
    parent.appendChild(el);
  }
}
const blockEls = [];
if (diffusion) {
  const B = D.block_size, SB = D.sub_block_size;
  for (let b0 = D.first_block, n = 1; b0 < D.end; b0 += B, n++) {
    const blk = document.createElement("div");
    blk.className = "block";
    const lo = Math.max(b0, D.tail_from), hi = Math.min(b0 + B, D.end);
    blk.innerHTML = `<div class="bhead"><b>block ${n}</b> · positions ${lo}–${hi - 1}` +
      ` · ${B / SB} sub-blocks of ${SB}</div><div class="subs"></div>`;
    for (let s0 = b0, k = 0; s0 < b0 + B; s0 += SB, k++) {
      const a = Math.max(s0, lo), z = Math.min(s0 + SB, hi);
      if (a >= z) continue;
      const sub = document.createElement("div");
      sub.className = "sub";
      sub.innerHTML = `<span class="slabel">sub-block ${k + 1}</span>`;
      fillRange(sub, a, z);
      blk.querySelector(".subs").appendChild(sub);
    }
    blk.dataset.lo = lo; blk.dataset.hi = hi;
    blockEls.push(blk);
    $("blocks").appendChild(blk);
  }
} else {
  const blk = document.createElement("div");
  blk.className = "block";
  blk.innerHTML = `<div class="bhead"><b>generated tokens</b> · autoregressive, one per forward</div>` +
    `<div class="flow"></div>`;
  fillRange(blk.querySelector(".flow"), D.start, D.end);
  $("blocks").appendChild(blk);
}

// legend
function legend() {
  const lg = $("legend");
  const stops = [0, .25, .5, .75, 1].map((f) => css(color(f * (T - 1))));
  lg.innerHTML = `<span class="scale">decoded at step <b>1</b><span class="grad"></span><b>${T}</b></span>`;
  lg.querySelector(".grad").style.background = `linear-gradient(90deg, ${stops.join(",")})`;
  for (const [cls, text, what] of [["mask", "[MASK]", "not decoded yet"],
      ["new", "tok", "decoded in this step"], ["prompt", "tok", "prompt"],
      ["dropped", "tok", "after the stop token"], ["conf", "tok", "bar: confidence"]]) {
    if ((cls === "prompt" && !D.prompt_tail.length) || (cls === "dropped" && D.end <= D.output_end)) continue;
    const s = document.createElement("span");
    s.className = "scale";
    s.innerHTML = `<span class="tok ${cls}"></span>${what}`;
    s.firstChild.textContent = text;
    if (cls === "new" || cls === "dropped" || cls === "conf") {
      s.firstChild.style.background = css(color((T - 1) / 2));
      s.firstChild.style.color = light(color((T - 1) / 2)) ? "#111" : "#fff";
    }
    if (cls === "conf") s.firstChild.innerHTML = 'tok<i class="conf" style="width:calc(70% - 6px)"></i>';
    lg.appendChild(s);
  }
}
legend();

// per-step bars (tokens unmasked per forward), clickable
const maxN = Math.max(1, ...D.trace.map((s) => s.positions.length));
const bars = D.trace.map((s, i) => {
  const b = document.createElement("div");
  b.className = "bar";
  b.style.height = `${Math.max(8, 100 * s.positions.length / maxN)}%`;
  b.style.background = css(color(i));
  b.addEventListener("click", () => show(i + 1));
  b.addEventListener("mouseenter", () => tip(b, `<b>step ${i + 1}</b> · ${s.kind}<br>` +
    `${s.positions.length} token${s.positions.length > 1 ? "s" : ""} unmasked`));
  b.addEventListener("mouseleave", () => { $("tip").hidden = true; });
  $("bars").appendChild(b);
  return b;
});

// state at slider value v: trace steps [0, v) applied
let cur = -1;
function show(v) {
  v = Math.max(0, Math.min(T, v | 0));
  cur = v;
  $("slider").value = v;
  $("steplabel").textContent = `step ${v} / ${T}`;
  for (const [p, el] of chips) {
    if (p < D.start) continue;
    const d = decodedAt.get(p);
    el.innerHTML = "";
    el.style.background = el.style.color = "";
    if (!d || d.step >= v) { el.className = "tok mask"; el.textContent = "MASK"; continue; }
    const rgb = color(d.step);
    el.className = "tok" + (light(rgb) ? " light" : "") + (isSpecial.has(d.token) ? " special" : "") +
      (d.step === v - 1 ? " new" : "") + (v === T && p >= D.output_end ? " dropped" : "");
    el.textContent = label(d.token);
    el.style.background = css(rgb);
    el.style.color = light(rgb) ? "#111" : "#fff";
    const bar = document.createElement("i");
    bar.className = "conf";
    bar.style.width = `calc(${(100 * d.conf).toFixed(1)}% - 6px)`;
    el.appendChild(bar);
  }
  bars.forEach((b, i) => { b.className = "bar" + (i < v ? " on" : "") + (i === v - 1 ? " cur" : ""); });
  let active = null;
  if (v > 0) {
    const s = D.trace[v - 1], c = s.confidences;
    $("stepinfo").textContent = `step ${v} · ${s.kind} forward · ${s.positions.length} token` +
      `${s.positions.length > 1 ? "s" : ""} unmasked · confidence ${Math.min(...c).toFixed(2)}` +
      (c.length > 1 ? `–${Math.max(...c).toFixed(2)}` : "");
    active = s.positions[0];
  } else {
    $("stepinfo").textContent = "before the first forward: every generated position is [MASK]";
  }
  blockEls.forEach((b) => b.classList.toggle("active",
    active !== null && active >= +b.dataset.lo && active < +b.dataset.hi));
  try { history.replaceState(null, "", `#step=${v}`); } catch (e) { /* file:// in some browsers */ }
}

// tooltip
function tip(el, content) {
  const t = $("tip");
  t.innerHTML = content;
  t.hidden = false;
  const r = el.getBoundingClientRect(), w = t.offsetWidth, h = t.offsetHeight;
  t.style.left = `${Math.max(6, Math.min(innerWidth - w - 6, r.left + r.width / 2 - w / 2))}px`;
  t.style.top = `${r.top - h - 8 < 4 ? r.bottom + 8 : r.top - h - 8}px`;
}
const esc = (s) => s.replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]);
const row = (k, v) => `<br><span class="k">${k}</span> ${v}`;
function tokenTip(p, id, prompt) {  // the tooltip's HTML for the chip at position p
  const d = decodedAt.get(p), B = D.block_size;
  let where = `position ${p}`;
  if (diffusion) where += ` · block ${Math.floor((p - D.first_block) / B) + 1}` +
    ` · sub-block ${Math.floor((p % B) / D.sub_block_size) + 1}`;
  if (prompt) return `<div class="t">${esc(label(id))}</div>${where}` + row("prompt token", id);
  if (!d || d.step >= cur)
    return `<div class="t">[MASK]</div>${where}` + (d ? row("decoded at step", d.step + 1) : row("never decoded", ""));
  let rule = "";  // the threshold only decides refinement forwards
  if (diffusion && (d.kind === "full_block" || d.kind === "sub_block"))
    rule = d.conf > D.threshold ? ` &gt; threshold ${D.threshold}` : ` ≤ threshold: the step's most confident`;
  return `<div class="t">${esc(label(d.token))}</div>${where}` + row("token id", d.token) +
    row("decoded at step", `${d.step + 1} (${d.kind} forward)`) + row("confidence", d.conf.toFixed(4) + rule) +
    (D.finish_reason === "stop" && p === D.output_end - 1 ? row("the stop token", "") : "") +
    (p >= D.output_end ? row("after the stop token: not part of the output", "") : "");
}
$("blocks").addEventListener("mouseover", (e) => {
  const el = e.target.closest(".tok");
  if (el) tip(el, tokenTip(+el.dataset.pos, el.dataset.id, el.classList.contains("prompt")));
});
$("blocks").addEventListener("mouseout", (e) => { if (e.target.closest(".tok")) $("tip").hidden = true; });

// playback
let timer = null;
const PLAY = '<svg viewBox="0 0 16 16"><path d="M4 2.5v11l9.5-5.5z"/></svg>';
const PAUSE = '<svg viewBox="0 0 16 16"><path d="M4 3h3v10H4zM9 3h3v10H9z"/></svg>';
function pause() { clearInterval(timer); timer = null; $("play").innerHTML = PLAY; }
function play() {
  if (cur >= T) show(0);
  $("play").innerHTML = PAUSE;
  const every = Math.max(150, 4000 / Math.max(T, 1));  // a whole replay in about 4 s
  timer = setInterval(() => { if (cur >= T) pause(); else show(cur + 1); }, every);
}
$("play").addEventListener("click", () => (timer ? pause() : play()));
$("prev").addEventListener("click", () => { pause(); show(cur - 1); });
$("next").addEventListener("click", () => { pause(); show(cur + 1); });
$("slider").max = T;
$("slider").addEventListener("input", (e) => { pause(); show(+e.target.value); });
document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT" && e.key !== " ") return;
  if (e.key === "ArrowLeft") { pause(); show(cur - 1); }
  else if (e.key === "ArrowRight") { pause(); show(cur + 1); }
  else if (e.key === " ") { e.preventDefault(); timer ? pause() : play(); }
});
pause();
const m = /step=(\d+)/.exec(location.hash);
show(m ? +m[1] : T);
"""
