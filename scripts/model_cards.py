"""Write the model cards (README.md) of the shipped models from what was measured:
the training summaries in each model directory and, when present, the benchmark results
in docs/results/gsm_bench.json. Run after the benchmark to refresh the numbers:

    python scripts/model_cards.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fastdllm.atomic import atomic_write_text  # noqa: E402
from fastdllm.tasks import FAMILIES  # noqa: E402

MODELS = {"ar": ROOT / "models" / "fastdllm-wp-ar", "diffusion": ROOT / "models" / "fastdllm-wp-diffusion"}
BENCH = ROOT / "docs" / "results" / "gsm_bench.json"
# accuracy of the adapted model per decoding setting (benchmarks/bench_adaptation.py, bench_rules.py)
ADAPTATION = [ROOT / "docs" / "results" / "adaptation" / "test_shipped.json"]


def _summary(d: Path, name: str = "training_summary.json") -> dict:
    p = d / name
    return json.loads(p.read_text()) if p.is_file() else {}


def _params(d: Path) -> tuple[int, float]:
    from safetensors.torch import load_file

    n = sum(t.numel() for t in load_file(str(d / "model.safetensors")).values())
    return n, (d / "model.safetensors").stat().st_size / 2**20


def _tokens(summary: dict) -> int | None:
    return int(summary["tokens_seen"]) if "tokens_seen" in summary else None


def _steps_line(summary: dict, what: str = "") -> str:
    if "steps" not in summary or "config" not in summary:
        return ""
    c = summary["config"]
    return (f"- {what}{summary['steps']:,} optimizer steps of {summary['global_batch_rows']} rows x "
            f"{c['data']['seq_len']} tokens, peak learning rate {c['optimizer']['lr']:g} "
            f"({c['optimizer']['schedule']}), final validation loss {summary['final_val_loss']:.4f}\n")


def _results_section(bench: dict, which: str) -> str:
    if not bench:
        return "Benchmark not run yet: `python benchmarks/bench_gsm.py` fills this section.\n"
    kinds = {"ar": ("ar_engine", "ar_transformers"),
             "diffusion": ("ar_engine", "diffusion", "diagnostic", "ablation")}[which]
    lines = ["| batch | configuration | accuracy | tokens/s | tokens/forward |", "|---|---|---|---|---|"]
    for r in bench.get("rows", []):
        if r["kind"] in kinds and r["status"] == "ok":
            tpf = f"{r['tokens_per_forward']:.2f}" if r.get("tokens_per_forward") else ""
            lines.append(f"| {r['batch']} | {r['config']} | {100 * r['accuracy']:.1f}% | "
                         f"{r['tokens_per_s']:.1f} | {tpf} |")
    m = bench.get("machine", {})
    n = bench.get("args", {}).get("limit", "?")
    return (f"Measured by `benchmarks/bench_gsm.py` on {n} held-out problems, greedy, fp32 "
            f"({m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}, "
            f"{m.get('date', '?')}):\n\n" + "\n".join(lines) + "\n\n"
            "Full table, goals and plot: [docs/results/gsm_bench.md](../../docs/results/gsm_bench.md).\n")


def _adaptation_section() -> str:
    """The diffusion card's accuracy table, from the adaptation and decoding-rule benchmarks."""
    lines = ["| decoding | accuracy | tokens/forward |", "|---|---|---|"]
    for path in ADAPTATION:
        if not path.is_file():
            continue
        for r in json.loads(path.read_text())["rows"]:
            setting = r.get("setting") or f"{r['rule'].replace('_', '-')} rule, t={r['threshold']:g}"
            setting = setting.replace("threshold rule", "official rule")
            if setting.startswith("t="):
                setting = f"official rule, {setting}"
            elif setting.startswith("la="):
                setting = f"left-anchored rule, t={setting[3:]}" + (" (default)" if setting == "la=0.9" else "")
            lines.append(f"| {setting} | {100 * r['accuracy']:.1f}% | {r['tokens_per_forward']:.2f} |")
    if len(lines) == 2:
        return ""
    return ("Accuracy on the 500 held-out test problems, greedy, fp32 (`benchmarks/bench_adaptation.py`, "
            "`benchmarks/bench_rules.py`; the AR base scores 91.0% on them). The default decoding is the "
            "left-anchored rule at t=0.9; `causal` is this model decoded autoregressively (`--mode ar`):\n\n"
            + "\n".join(lines) + "\n\nWhy and how: [docs/shipped_models.md](../../docs/shipped_models.md).\n\n")


def card(which: str, bench: dict) -> str:
    d = MODELS[which]
    cfg = json.loads((d / "config.json").read_text())
    n, mib = _params(d)
    pre_tokens, ad_tokens = _tokens(_summary(MODELS["ar"])), _tokens(_summary(MODELS["diffusion"]))
    budget = ""
    if pre_tokens and ad_tokens:
        budget = (f"- AR pretraining: {pre_tokens:,} tokens; adaptation: {ad_tokens:,} tokens "
                  f"({100 * ad_tokens / pre_tokens:.0f}% of pretraining)\n")
    title = {"ar": "fastdllm-wp-ar: the AR base", "diffusion": "fastdllm-wp-diffusion: the Fast-dLLM v2 adapted model"}[which]
    recipe = {
        "ar": ("Trained from scratch with the AR objective (`configs/shipped/pretrain.yaml`): next-token "
               "loss on the answers of chat-formatted problems, packed rows of 256 tokens."),
        "diffusion": ("Adapted from fastdllm-wp-ar with the Fast-dLLM v2 recipe (`configs/shipped/adapt.yaml`): "
                      "blocks of 32, per-block mask ratio t ~ U(0,1) (eps 1e-3), complementary masks, "
                      "noisy+clean concatenation with the block-diffusion attention mask, token shift, "
                      "blocks padded with loss-bearing end-of-turn tokens, plus the causal next-token "
                      "(AR) loss of the clean rows with weight 3. Saved in the official "
                      "Fast_dLLM_v2 layout (`Fast_dLLM_QwenForCausalLM`, `bd_size` 32, `|<MASK>|`)."),
    }[which]
    fine = _summary(d, "certainty_summary.json") if which == "diffusion" else {}
    if fine:
        d_cfg = fine["config"]["diffusion"]
        recipe += (" Then certainty distillation (`configs/shipped/certainty.yaml`, docs/design.md): "
                   f"{int(fine['tokens_seen']):,} more tokens on the states the left-anchored rule visits "
                   "(per block a cut, everything from it on masked; no complementary twin), the same "
                   f"losses plus -log(1 - p_argmax) of every wrong prediction (weight "
                   f"{d_cfg['wrong_confidence_weight']:g}), so that confident mistakes, which a threshold "
                   "accepts, become rare.")
    usage = {"ar": "--mode ar", "diffusion": "--threshold 0.9"}[which]
    # the diffusion card's speed table is gsm_bench's only while that run measured this model
    adaptation = _adaptation_section() if which == "diffusion" else ""
    results = adaptation or _results_section(bench, which)
    return f"""# {title}

A small Qwen2-architecture model trained by the fastdllm project on synthetic grade-school math
word problems, so that fastdllm runs out of the box on a CPU. It answers in the GSM8K format
(step-by-step arithmetic lines, then `#### <answer>`). It knows nothing else.

```bash
fastdllm generate --model models/{d.name} --chat {usage} --prompt "Mia buys 3 pens for 4 dollars each and pays with 20 dollars. How much change does she get?"
```

## Model
- Architecture: Qwen2 (q/k/v bias, GQA {cfg['num_attention_heads']}:{cfg['num_key_value_heads']}, tied embeddings), hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, MLP {cfg['intermediate_size']}, vocabulary {cfg['vocab_size']}, context {cfg['max_position_embeddings']}
- Parameters: {n / 1e6:.2f} M; weights stored in bfloat16 ({mib:.1f} MiB; fastdllm upcasts to fp32 on CPU)
- Tokenizer: byte-level BPE trained on the training text, digits split one by one, ChatML template, `|<MASK>|`

## Data
`fastdllm.tasks.word_problems`: {len(FAMILIES)} problem families (shopping and change, sharing, rates and
time, ages, percentages, unit conversions, areas, multi-step combinations), 2 to 5 steps each.
200,000 training problems (seed 1), 2,000 held-out test problems (seed 2), disjoint.

## Training
{recipe}
{budget}{_steps_line(_summary(d), "Adaptation: " if fine else "")}{_steps_line(fine, "Certainty fine-tune: ")}- Training summary: `training_summary.json` beside this card{" (the adaptation; `certainty_summary.json` the fine-tune)" if fine else ""}
- Rebuild from scratch: `python scripts/build_shipped_models.py`

## Results
{results}"""


def write_cards() -> None:
    bench = json.loads(BENCH.read_text()) if BENCH.is_file() else {}
    for which, d in MODELS.items():
        if (d / "config.json").is_file():
            atomic_write_text(d / "README.md", card(which, bench))
            print(f"wrote {d / 'README.md'}")


if __name__ == "__main__":
    write_cards()
