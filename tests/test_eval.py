"""`fastdllm eval` and the lm-eval model `fastdllm` on the shipped models.

- `fastdllm eval`: fields present, accuracy and CI consistent with the outputs, every output
  equal to `LLM.generate_batch` on the same prompts, speed figures consistent with the outputs.
- lm-eval's own evaluator (`simple_evaluate`) runs the registered `fastdllm` model on the
  packaged offline task and gets the same accuracy and texts as `fastdllm eval`.
- the exact `lm_eval --model fastdllm ...` command line on ../shared/data/gsm8k/test.jsonl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastdllm.cli import main
from fastdllm.evaluation.gsm8k_eval import EvalConfig, chat_messages, evaluate
from fastdllm.evaluation.report import wilson_interval
from fastdllm.llm import LLM
from fastdllm.tasks import generate_problems, write_jsonl
from fixtures import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")
DIFFUSION = REPO_ROOT / "models" / "fastdllm-wp-diffusion"
AR = REPO_ROOT / "models" / "fastdllm-wp-ar"
GSM8K = REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
MAX_NEW = 96


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory) -> Path:
    """Held-out-style word problems in GSM8K format (the shipped model scores well above 0 on
    them, so accuracy comparisons are not 0 == 0)."""
    return write_jsonl(generate_problems(6, seed=12345), tmp_path_factory.mktemp("wp") / "test.jsonl")


@pytest.fixture(scope="module")
def dif() -> LLM:
    return LLM.load(DIFFUSION, device="cpu")


def test_wilson_interval():
    lo, hi = wilson_interval(0, 4)
    assert lo == 0.0 and 0.48 < hi < 0.50  # 0/4: [0, 0.490]
    lo, hi = wilson_interval(45, 50)
    assert 0.78 < lo < 0.79 and 0.95 < hi < 0.96
    assert wilson_interval(0, 0) == (0.0, 0.0)


def test_fastdllm_eval_matches_generate(tmp_path, problems_file, dif, capsys):
    out = tmp_path / "res.json"
    rc = main(["eval", "--model", str(DIFFUSION), "--data", str(problems_file), "--limit", "5",
               "--num-fewshot", "1", "--batch-size", "3", "--max-new-tokens", str(MAX_NEW),
               "--threshold", "0.9", "--compare-ar", "--ar-model", str(AR), "--json", str(out),
               "--no-progress", "--device", "cpu"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert "| diffusion |" in out.with_suffix(".md").read_text() and "95% CI" in capsys.readouterr().out
    assert result["problems"] == 5 and result["num_fewshot"] == 1
    first, ar = result["runs"]
    assert (first["mode"], ar["mode"], ar["model"]) == ("diffusion", "ar", str(AR))
    rows = [json.loads(x) for x in problems_file.read_text().splitlines()]
    for run, llm in ((first, dif), (ar, LLM.load(AR, device="cpu"))):
        assert run["total"] == 5 and run["correct"] == sum(o["correct"] for o in run["outputs"])
        assert run["accuracy"] == run["correct"] / 5
        lo, hi = run["accuracy_ci95"]
        assert lo <= run["accuracy"] <= hi
        s = run["speed"]
        assert s["generated_tokens"] == sum(o["generated_tokens"] for o in run["outputs"]) > 0
        assert s["tokens_per_forward"] == round(s["generated_tokens"] / sum(o["forwards"] for o in run["outputs"]), 4)
        assert s["tokens_per_second"] > 0 and 0 < s["forwards"] <= sum(o["forwards"] for o in run["outputs"])
        # the same problems through the Python API, one batch: the same texts and tokens
        prompts = [llm.encode_chat(chat_messages(r["question"], rows[:1])) for r in rows[1:6]]
        ref = llm.generate_batch(prompts, mode=run["mode"], threshold=0.9, max_new_tokens=MAX_NEW)
        assert [o["text"] for o in run["outputs"]] == [r.text for r in ref]
        assert [o["generated_tokens"] for o in run["outputs"]] == [len(r.token_ids) for r in ref]
    assert result["speedup_vs_ar"] == round(first["speed"]["tokens_per_second"] / ar["speed"]["tokens_per_second"], 3)


def test_fastdllm_eval_errors(tmp_path, capsys):
    data = write_jsonl(generate_problems(2, seed=1), tmp_path / "d.jsonl")
    assert main(["eval", "--model", str(DIFFUSION), "--data", str(data), "--num-fewshot", "2"]) == 2
    assert "none is left to evaluate" in capsys.readouterr().err
    assert main(["eval", "--model", str(DIFFUSION), "--data", str(data), "--limit", "0"]) == 2
    assert "--limit: limit must be >= 1" in capsys.readouterr().err
    assert main(["eval", "--model", str(DIFFUSION), "--data", str(tmp_path / "no.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(Exception):
        EvalConfig(data, batch_size=0)


def test_lm_eval_evaluator_equals_fastdllm_eval(problems_file, dif):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from fastdllm.evaluation import TASKS_DIR
    from fastdllm.evaluation.harness import FastDLLMLM

    cfg = EvalConfig(problems_file, limit=4, batch_size=2, progress=False)
    ours = evaluate(dif, cfg, model=str(DIFFUSION), threshold=1.0, max_new_tokens=MAX_NEW)["runs"][0]
    lm = FastDLLMLM(llm=dif, mode="diffusion", threshold=1.0, batch_size=2)
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,  # no index of 10k YAMLs
                     metadata={"data_file": str(problems_file)})
    res = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k_local"], task_manager=tm, limit=4,
                                  apply_chat_template=True, log_samples=True,
                                  gen_kwargs=f"max_gen_toks={MAX_NEW}")
    acc = res["results"]["gsm8k_local"]["exact_match,none"]
    assert acc == ours["accuracy"] > 0
    samples = sorted(res["samples"]["gsm8k_local"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == [o["text"] for o in ours["outputs"]]
    assert lm.speed.generated_tokens == ours["speed"]["generated_tokens"]


def test_generate_until_stop_strings_and_budget(dif):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from fastdllm.evaluation.harness import FastDLLMLM

    lm = FastDLLMLM(llm=dif, mode="ar", batch_size=2)
    prompt = lm.apply_chat_template([{"role": "user", "content": "Tom has 5 apples and buys 7 more. "
                                      "How many apples does he have?"}])
    full = dif.generate(messages=[{"role": "user", "content": "Tom has 5 apples and buys 7 more. "
                                   "How many apples does he have?"}], mode="ar", max_new_tokens=64).text
    word = full.split()[3]
    reqs = [Instance("generate_until", {}, (prompt, {"until": [word], "max_gen_toks": 64}), 0),
            Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 5}), 1),
            Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 64}), 2)]
    stopped, short, whole = lm.generate_until(reqs, disable_tqdm=True)
    assert whole == full
    assert stopped == full[:full.index(word)]  # cut before the stop string
    assert len(dif.tokenizer.encode(short, add_special_tokens=False)) <= 5 and full.startswith(short)


def test_loglikelihood_through_lm_eval_api(dif):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from fastdllm.evaluation.harness import FastDLLMLM
    from fastdllm.evaluation.loglikelihood import continuation_logprobs

    lm = FastDLLMLM(llm=dif, mode="diffusion")
    ctx, cont = "Mia has 3 pens.", " She buys 4 more."
    (ll, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)], disable_tqdm=True)
    c_ids = dif.tokenizer.encode(ctx)
    w_ids = dif.tokenizer.encode(ctx + cont)
    logp, g = continuation_logprobs(dif.model, c_ids, w_ids[len(c_ids):], mode="diffusion",
                                    block_size=dif.default_block_size, mask_token_id=dif.special.mask_token_id)
    assert ll == pytest.approx(float(logp.sum())) and greedy == bool(g.all()) and ll < 0
    # rolling: one window over the whole text after the prefix token equals scoring it directly
    (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (ctx + cont,), 0)],
                                         disable_tqdm=True)
    logp, _ = continuation_logprobs(dif.model, [lm.prefix_token_id], w_ids, mode="diffusion",
                                    block_size=dif.default_block_size, mask_token_id=dif.special.mask_token_id)
    assert rolled == pytest.approx(float(logp.sum()))


@pytest.mark.skipif(not GSM8K.is_file(), reason=f"{GSM8K} not found")
def test_lm_eval_command_line(tmp_path):
    """The README's line: `lm_eval --model fastdllm ...` on the offline GSM8K task."""
    pytest.importorskip("lm_eval")
    exe = Path(sys.executable).with_name("lm_eval")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1")
    cmd = [str(exe), "--model", "fastdllm", "--model_args",
           f"pretrained={DIFFUSION},mode=diffusion,threshold=0.9", "--device", "cpu",
           "--batch_size", "2", "--include_path", "src/fastdllm/evaluation/tasks",
           "--tasks", "gsm8k_local", "--metadata", json.dumps({"data_file": str(GSM8K)}),
           "--apply_chat_template", "--limit", "2", "--gen_kwargs", "max_gen_toks=32",
           "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gsm8k_local" in proc.stdout and "exact_match" in proc.stdout
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["results"]["gsm8k_local"]["exact_match,none"] >= 0.0
    assert results["config"]["model"] == "fastdllm"


def test_fastdllm_eval_sweep_reports_the_frontier_and_its_aup(tmp_path, problems_file):
    from fastdllm.evaluation.aup import aup

    out = tmp_path / "sweep.json"
    rc = main(["eval", "--model", str(DIFFUSION), "--data", str(problems_file), "--limit", "4",
               "--batch-size", "4", "--max-new-tokens", str(MAX_NEW), "--threshold", "0.9",
               "--sweep", "1.0,0.7", "--compare-ar", "--json", str(out), "--no-progress",
               "--device", "cpu"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [r["threshold"] for r in result["runs"][:3]] == [0.9, 1.0, 0.7] and result["runs"][3]["mode"] == "ar"
    f = result["frontier"]
    pts = [(r["speed"]["tokens_per_forward"], 100 * r["accuracy"]) for r in result["runs"][:3]]
    assert sorted(pts) == [(p["tokens_per_forward"], p["accuracy"]) for p in f["points"]]
    assert f["y_max"] == 100 * max(r["accuracy"] for r in result["runs"])
    assert f["aup"] == pytest.approx(aup(pts, y_max=f["y_max"]))
    assert "AUP" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(DIFFUSION), "--data", str(problems_file), "--sweep", "1.5"])
