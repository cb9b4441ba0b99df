"""Accuracy with a confidence interval, and the markdown summary of an evaluation run."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (stays inside [0, 1] and is sensible at
    0 or n successes, unlike the normal approximation)."""
    if total <= 0:
        return 0.0, 0.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def markdown_summary(result: dict) -> str:
    """A short markdown report of `fastdllm eval`'s JSON result."""
    lines = [f"# fastdllm eval: {result['data']}", "",
             f"{result['problems']} problems, {result['num_fewshot']}-shot, chat template, "
             f"max_new_tokens {result['max_new_tokens']}, batch size {result['batch_size']}, "
             f"device {result['device']}.", "",
             "| run | model | mode | threshold | accuracy | 95% CI | generated tokens | forwards | "
             "tokens/forward | tokens/s | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        lo, hi = run["accuracy_ci95"]
        s = run["speed"]
        thr = run["threshold"] if run["mode"] == "diffusion" else "–"
        if run["mode"] == "diffusion" and run.get("rule", "threshold") != "threshold":
            thr = f"{thr} ({run['rule']})"
        lines.append(
            f"| {run['name']} | {run['model']} | {run['mode']} | {thr} | {100 * run['accuracy']:.1f}% "
            f"({run['correct']}/{run['total']}) | {100 * lo:.1f}–{100 * hi:.1f}% | "
            f"{s['generated_tokens']} | {s['forwards']} | {s['tokens_per_forward']:.2f} | "
            f"{s['tokens_per_second']:.1f} | {s['seconds']:.2f} |")
    if "speedup_vs_ar" in result:
        lines += ["", f"Speed-up of the first run over the AR run (tokens/s): "
                      f"{result['speedup_vs_ar']:.2f}x."]
    if "frontier" in result:
        f = result["frontier"]
        lines += ["", f"AUP (accuracy under parallelism, d3LLM's definition) of the diffusion runs: "
                      f"{f['aup']:.2f} (y_max {f['y_max']:.1f}%, {len(f['points'])} points)."]
    lines += ["", "Generated tokens: output tokens up to and including the stop token (never prompt "
              "tokens or masks); tokens/forward: generated tokens / forwards each sequence took part "
              "in; forwards: model calls of the run (a batched call counts once); tokens/s: generated "
              "tokens / wall seconds of decoding. 95% CI: Wilson score interval.", ""]
    return "\n".join(lines)


def plot_frontier(result: dict, out) -> None:
    """The frontier of a `fastdllm eval --sweep` run as a PNG: accuracy against tokens per
    forward, the AR run (if any) as a line. Needs matplotlib."""

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..atomic import atomic_write_png

    f = result["frontier"]
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [p["tokens_per_forward"] for p in f["points"]]
    ys = [p["accuracy"] for p in f["points"]]
    ax.plot(xs, ys, marker="o", label=f"diffusion (AUP {f['aup']:.1f})")
    for p in f["points"]:
        ax.annotate(f"{p['threshold']:g}", (p["tokens_per_forward"], p["accuracy"]),
                    textcoords="offset points", xytext=(4, 3), fontsize=7)
    for run in result["runs"]:
        if run["mode"] == "ar":
            ax.axhline(100 * run["accuracy"], color="black", linestyle="--", label="AR")
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    atomic_write_png(out, fig)
