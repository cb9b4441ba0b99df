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
  if (D.rule && D.rule !== "threshold") stat("rule", D.rule.replace("_", "-"));
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
    rule = D.rule && D.rule !== "threshold" ? ` (chosen by the ${D.rule.replace("_", "-")} rule)`
      : d.conf > D.threshold ? ` &gt; threshold ${D.threshold}` : ` ≤ threshold: the step's most confident`;
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
