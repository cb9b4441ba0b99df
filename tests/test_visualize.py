"""The HTML decoding replay: self-contained, complete, escaped, and rendered by a real browser.

The browser tests use Debian's chromium (installed in CI by .ci/install_browser.sh). Without it
they fail in CI and are skipped locally (when the CI variable is unset).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fastdllm import LLM
from fastdllm.cli import main
from fastdllm.errors import FastDLLMError
from fastdllm.visualize import replay_data, token_labels, visible, write_html
from fixtures import special_token_ids

# text that would break out of the page if it were not escaped
NASTY = 'Once upon a time </script><img src=x onerror="alert(1)"> & <!-- \u00e9\nWhat is 3+4?'


def embedded(page: str) -> dict:
    m = re.search(r'<script id="replay-data" type="application/json">(.*?)</script>', page, re.S)
    assert m, "the replay data is not embedded"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def confident_llm(checkpoint_factory) -> LLM:
    # a large lm_head_scale gives confident predictions: several tokens unmasked per step
    return LLM.load(checkpoint_factory("qwen2", lm_head_scale=40.0))


@pytest.fixture(scope="module")
def replay(confident_llm, tmp_path_factory):
    result = confident_llm.generate(messages=[{"role": "user", "content": NASTY}], max_new_tokens=48,
                                    threshold=0.5, trace=True)
    path = write_html(tmp_path_factory.mktemp("viz") / "replay.html", confident_llm, result)
    return path, result


def test_page_is_self_contained_escaped_and_complete(replay, confident_llm):
    path, result = replay
    page = path.read_text(encoding="utf-8")
    assert not re.search(r"https?://", page, re.I)
    assert not re.search(r"<(link|img|iframe)\b", page, re.I)
    assert page.count("</script>") == 2  # the data and the code; the prompt's </script> is escaped
    data = embedded(page)
    assert data["trace"] == result.trace
    assert max(len(s["positions"]) for s in result.trace) > 1  # a parallel step to show
    # every output position was decoded by exactly one traced step, with the output's token
    decoded = {p: t for s in result.trace for p, t in zip(s["positions"], s["tokens"])}
    start = result.prompt_tokens
    for i, token in enumerate(result.token_ids):
        assert decoded[start + i] == token
        assert data["labels"][str(token)] == token_labels(confident_llm.tokenizer, [token])[0]
    assert data["mode"] == "diffusion" and data["threshold"] == 0.5
    assert (data["block_size"], data["sub_block_size"]) == (32, 8)
    assert data["stats"]["forward_calls"] == result.stats["forward_calls"]
    assert "What is 3+4?" in data["prompt_text"] or data["prompt_tail"]
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left no temp file


def test_token_labels():
    assert visible("a\nb") == "a\u21b5b"
    assert visible("  ") == "\u2423\u2423"
    assert visible("") == "\u2205"
    assert visible("\x16x\t") == "\\x16x\u21e5"
    assert token_labels(None, [7, 300]) == ["#7", "#300"]


def test_token_labels_byte_fragments(confident_llm):
    tok = confident_llm.tokenizer
    ids = tok.encode("é\n", add_special_tokens=False)
    labels = token_labels(tok, ids)
    assert "".join(labels) in ("é\u21b5", "\\xc3\\xa9\u21b5")  # é whole, or as two byte fragments
    euro = tok.encode("€", add_special_tokens=False)  # not in the tiny corpus: 3 byte tokens
    assert "".join(token_labels(tok, euro)) == "\\xe2\\x82\\xac"
    assert token_labels(tok, [special_token_ids()["im_end"]]) == ["<|im_end|>"]
    beyond = confident_llm.config.vocab_size - 1  # the model's vocabulary is padded past the tokenizer's
    assert token_labels(tok, [beyond]) == [f"#{beyond}"]


def test_ar_mode_and_no_tokenizer(checkpoint_factory, tmp_path):
    ckpt = checkpoint_factory("qwen2", with_tokenizer=False, lm_head_scale=40.0)
    llm = LLM.load(ckpt, mask_token_id=special_token_ids()["mask"])
    ar = llm.generate([5, 6, 7, 8], mode="ar", max_new_tokens=6, trace=True)
    data = replay_data(llm, ar)
    assert data["mode"] == "ar" and data["block_size"] == 1 and data["threshold"] is None
    assert [len(s["positions"]) for s in data["trace"]] == [1] * 6
    assert all(data["labels"][str(t)] == f"#{t}" for t in ar.token_ids)
    assert data["text"] == " ".join(map(str, ar.token_ids))
    diff = llm.generate([5, 6, 7, 8], max_new_tokens=8, trace=True)
    page = write_html(tmp_path / "d.html", llm, diff).read_text()
    assert embedded(page)["prompt_tail"] == [5, 6, 7, 8]  # a short prompt sits in block 1


def test_needs_a_trace(confident_llm, tmp_path):
    result = confident_llm.generate("Once", max_new_tokens=4)
    with pytest.raises(FastDLLMError, match="trace"):
        write_html(tmp_path / "x.html", confident_llm, result)
    assert not list(tmp_path.iterdir())


def test_generate_cli_writes_the_replay(checkpoint_factory, tmp_path):
    out = tmp_path / "sub" / "r.html"
    ckpt = checkpoint_factory("qwen2", lm_head_scale=40.0)
    assert main(["generate", "--model", str(ckpt), "--prompt", "Once upon a time", "--max-new-tokens", "12",
                 "--threshold", "0.5", "--visualize", str(out)]) == 0
    data = embedded(out.read_text())
    assert data["stats"]["new_tokens"] == 12 and data["trace"]


# ---------------------------------------------------------------------------- in a browser
def chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: CI must run .ci/install_browser.sh first")
        pytest.skip("chromium is not installed (apt-get install chromium, or run .ci/install_browser.sh)")
    return exe


def run_chromium(tmp_path: Path, url: str, *args: str) -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900",
           *args, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_screenshot_renders(replay, tmp_path):
    import matplotlib.image as mpimg  # a test dependency: a missing one must fail, not skip

    path, result = replay
    png = tmp_path / "replay.png"
    run_chromium(tmp_path, path.as_uri() + f"#step={len(result.trace) // 2}", f"--screenshot={png}")
    assert png.is_file() and png.stat().st_size > 20_000
    pixels = (mpimg.imread(str(png))[..., :3] * 255).round().astype("uint8")  # (H, W, 3)
    assert pixels.shape[:2] == (900, 1280)
    colours = {tuple(p) for p in pixels[::3, ::3].reshape(-1, 3).tolist()}
    assert len(colours) > 200  # chips in a colour scale, text, not a blank or error page
    background = (pixels.astype(int) - [246, 247, 249]).__abs__().sum(-1) > 30
    assert background.mean() > 0.05


def chips(dom: str) -> dict[int, tuple[str, str]]:
    """position -> (class, text) of every generated-token chip in a dumped DOM."""
    out = {}
    for m in re.finditer(r'<span class="(tok[^"]*)" data-pos="(\d+)"[^>]*>(.*?)(?:<i |</span>)', dom):
        out[int(m.group(2))] = (m.group(1), html.unescape(m.group(3)))
    return out


def test_replay_state_in_the_browser(replay, tmp_path):
    path, result = replay
    data = embedded(path.read_text())
    step = len(result.trace) // 2
    shown = chips(run_chromium(tmp_path, path.as_uri() + f"#step={step}", "--dump-dom"))
    decoded_by = {p: i for i, s in enumerate(result.trace) for p in s["positions"]}
    start = result.prompt_tokens
    for i, token in enumerate(result.token_ids):
        cls, text = shown[start + i]
        if decoded_by[start + i] < step:
            assert text == data["labels"][str(token)] and "mask" not in cls
            assert ("new" in cls) == (decoded_by[start + i] == step - 1)
        else:
            assert "mask" in cls and text == "MASK"
    final = chips(run_chromium(tmp_path, path.as_uri(), "--dump-dom"))  # opens on the last step
    for i, token in enumerate(result.token_ids):
        assert final[start + i][1] == data["labels"][str(token)]
