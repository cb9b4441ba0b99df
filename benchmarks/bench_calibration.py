"""Calibration of the confidences the decoding rule reads, on the validation split; a
temperature fitted on one part of it, measured on another.

    python benchmarks/bench_calibration.py --model models/fastdllm-wp-diffusion --threads 1

Decodes problems of the validation split (sft_val.jsonl, never test) with the default decoding
(left-anchored rule, threshold 0.9; `--rule`, `--threshold`) and, through the runner's probe,
keeps the logits of every masked position a refinement step offers the rule. A state counts
while the decoded prefix before the step's first masked position equals the reference answer
(tokenized, plus the end-of-turn token), so "right" is well defined: the greedy token equals
the reference token (positions past the reference's end are left out). For each such state:

- marginal: each candidate's confidence (what the official rule compares) and whether it is right;
- joint: walking the candidates from the first in position order, the running product of
  confidences (what the left-anchored rule compares) and whether all of them are right.

The temperature is fitted (maximum likelihood of the reference tokens, evaluation/calibration.py)
on the states of problems [--fit-from, --fit-from + --fit-limit) and the ECEs and reliability
diagrams are reported on problems [0, --limit), before and after scaling. Writes
`<out>.json/.md/.png`. The frontier with the fitted temperature: benchmarks/bench_rules.py
--confidence-temperature T.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adaptation import load_split  # noqa: E402
from common import machine_info, write_results  # noqa: E402

from fastdllm.engine.sequence import PlanKind  # noqa: E402
from fastdllm.evaluation.calibration import ece, fit_temperature, reliability  # noqa: E402
from fastdllm.llm import LLM  # noqa: E402

REFINE = (PlanKind.FULL_BLOCK, PlanKind.SUB_BLOCK)


def collect(llm: LLM, problems: list[dict], rule: str, threshold: float, batch: int,
            max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (N, V), reference labels (N,) and step ids (N,) of the candidates of every state
    on the reference path, candidates of a step in position order."""
    params = llm.decode_config(mode="diffusion", rule=rule, threshold=threshold,
                               max_new_tokens=max_new_tokens)
    end_turn = llm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    logits_out, labels_out, steps_out = [], [], []
    step_id = 0
    for at in range(0, len(problems), batch):
        chunk = problems[at:at + batch]
        prompts = [llm.encode_chat([{"role": "user", "content": p["prompt"]}]) for p in chunk]
        refs = [llm.tokenizer.encode(p["answer"], add_special_tokens=False) + [end_turn] for p in chunk]
        engine = llm.engine(len(prompts), max(params.cache_len(len(x)) for x in prompts), params.block)
        seen: list[tuple] = []  # (sequence, first candidate, [(target, logits row)])

        def probe(rows, logits, spans):
            for (seq, plan), (a, _) in zip(rows, spans):
                if plan.kind not in REFINE:
                    continue
                cands = [(x + 1, a + i) for i, x in enumerate(plan.logit_positions) if seq.masked[x + 1]]
                if cands:
                    seen.append((seq, cands[0][0], [(t, logits[r].float().clone()) for t, r in cands]))

        engine.runner.probe = probe
        try:
            seqs = [engine.add(list(x), params) for x in prompts]
            for _ in engine.stream():
                pass
        finally:
            engine.runner.probe = None
        ref_of = {id(s): r for s, r in zip(seqs, refs)}
        for seq, first, cands in seen:
            ref, out, p0 = ref_of[id(seq)], seq.output_ids(), seq.prompt_len
            if first - p0 > len(ref) or out[:first - p0] != ref[:first - p0]:
                continue  # off the reference path: "right" is not defined
            for t, row in cands:
                if t - p0 < len(ref):
                    logits_out.append(row)
                    labels_out.append(ref[t - p0])
                    steps_out.append(step_id)
            step_id += 1
    return torch.stack(logits_out), torch.tensor(labels_out), torch.tensor(steps_out)


def confidences(logits: torch.Tensor, labels: torch.Tensor, steps: torch.Tensor, temperature: float):
    """(marginal conf, marginal right, joint conf, joint right) at `temperature`."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    conf, tok = probs.max(dim=-1)
    right = tok == labels
    joint_c, joint_r = torch.empty_like(conf), torch.empty_like(right)
    prod, ok, last = 1.0, True, None
    for i, s in enumerate(steps.tolist()):
        if s != last:
            prod, ok, last = 1.0, True, s
        prod *= float(conf[i])
        ok = ok and bool(right[i])
        joint_c[i], joint_r[i] = prod, ok
    return conf, right, joint_c, joint_r


def plot(diagrams: dict[str, list[dict]], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fastdllm.atomic import atomic_write_png

    fig = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(fig)
    for k, kind in enumerate(("marginal", "joint")):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfect calibration")
        for label, bins in diagrams.items():
            if label.startswith(kind):
                ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                        label=label)
        ax.set_xlabel("confidence read by the rule (bin mean)")
        ax.set_ylabel("share right")
        ax.set_title(f"{kind} ({'official rule' if kind == 'marginal' else 'left-anchored product'})",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    atomic_write_png(out, fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--val-file", type=Path, default=Path("runs/shipped/data/sft_val.jsonl"))
    ap.add_argument("--limit", type=int, default=300, help="measured on val problems [0, limit)")
    ap.add_argument("--fit-from", type=int, default=500)
    ap.add_argument("--fit-limit", type=int, default=300, help="fitted on val [fit-from, fit-from + this)")
    ap.add_argument("--rule", default="left_anchored")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--bins", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("docs/results/calibration_val"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    allp = load_split("val", args.val_file, args.fit_from + args.fit_limit)
    measure, fit = allp[:args.limit], allp[args.fit_from:]
    llm = LLM.load(args.model, device="cpu", dtype="float32", prefix_caching=False)
    fl, fy, _ = collect(llm, fit, args.rule, args.threshold, args.batch_size, args.max_new_tokens)
    t = fit_temperature(fl, fy)
    ml, my, ms = collect(llm, measure, args.rule, args.threshold, args.batch_size, args.max_new_tokens)
    rows, diagrams = [], {}
    for label, temp in (("T=1 (as decoded)", 1.0), (f"T={t:.3f} (fitted)", t)):
        mc, mr, jc, jr = confidences(ml, my, ms, temp)
        rows.append({"temperature": round(temp, 4), "states": int(ms.max()) + 1, "candidates": len(my),
                     "marginal accuracy": round(float(mr.double().mean()), 4),
                     "marginal mean conf": round(float(mc.mean()), 4),
                     "marginal ECE": round(ece(mc, mr, args.bins), 4),
                     "joint ECE": round(ece(jc, jr, args.bins), 4),
                     "NLL": round(float(torch.nn.functional.cross_entropy(ml.double() / temp, my)), 4)})
        diagrams[f"marginal, {label}"] = reliability(mc, mr, args.bins)
        diagrams[f"joint, {label}"] = reliability(jc, jr, args.bins)
        print(rows[-1], flush=True)
    cols = ["temperature", "states", "candidates", "marginal accuracy", "marginal mean conf",
            "marginal ECE", "joint ECE", "NLL"]
    rel_rows = [{"curve": k, **b} for k, bins in diagrams.items() for b in bins]
    notes = (f"Decoding: rule {args.rule}, threshold {args.threshold}, greedy, block 32 / sub-block 8. "
             f"Temperature fitted on the states of val problems [{args.fit_from}, "
             f"{args.fit_from + args.fit_limit}) ({len(fy)} candidates); measured on val problems "
             f"[0, {args.limit}). ECE with {args.bins} equal-width bins.")
    write_results(args.out, "Calibration of the rule's confidences (validation split)",
                  machine_info("cpu"),
                  [("ECE before and after temperature scaling", rows, cols),
                   ("Reliability diagrams", rel_rows, ["curve", "lo", "hi", "count", "confidence", "accuracy"])],
                  {"split": "val", "fitted_temperature": t, "fit_candidates": len(fy), "rows": rows,
                   "diagrams": diagrams, "model": str(args.model), "command": " ".join(sys.argv)}, notes)
    plot(diagrams, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
