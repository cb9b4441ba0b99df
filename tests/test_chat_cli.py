"""`fastdllm chat` in a pseudo-terminal: a scripted conversation, its history, /reset, /exit."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time

import pytest

from fastdllm import LLM
from fastdllm.text_stream import TextStream

PROMPT = "you> "
STATS = re.compile(r"\[diffusion\] (\d+) tokens · (\d+) forwards · [\d.]+ tokens/forward · "
                   r"[\d.]+ tokens/s · prompt (\d+) tokens")


class Terminal:
    """A child process on a pty: `expect` reads until a text appears, `send` types a line."""

    def __init__(self, argv: list[str]):
        self.master, slave = os.openpty()
        env = dict(os.environ, TERM="dumb", PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     close_fds=True)
        os.close(slave)
        self.buffer = b""

    def _read(self, deadline: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.buffer += chunk
        return bool(chunk)

    def expect(self, text: str, count: int, timeout: float = 180) -> None:
        """Wait until `text` has appeared `count` times in the whole output."""
        deadline = time.monotonic() + timeout
        while self.output.count(text) < count:
            if not self._read(deadline):
                pytest.fail(f"timed out waiting for {text!r}; output so far:\n{self.output}")

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def finish(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            pass
        rc = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        os.close(self.master)
        return rc

    @property
    def output(self) -> str:
        return self.buffer.decode("utf-8", errors="replace").replace("\r\n", "\n")


def test_two_turns_reset_and_exit(qwen2_ckpt):
    term = Terminal([sys.executable, "-m", "fastdllm.cli", "chat", "--model", str(qwen2_ckpt),
                     "--max-new-tokens", "16", "--stats"])
    try:
        # what the chat must reproduce: the same greedy decoding through the Python API
        llm = LLM.load(qwen2_ckpt)
        u1 = {"role": "user", "content": "Hello! Tell me a story."}
        u2 = {"role": "user", "content": "What is 3 + 4?"}
        r1 = llm.generate(messages=[u1], max_new_tokens=16)
        history = [u1, {"role": "assistant", "content": r1.text}, u2]
        r2 = llm.generate(messages=history, max_new_tokens=16)

        term.expect(PROMPT, 1)
        for n, line in enumerate([u1["content"], u2["content"], "/reset", u1["content"]], start=2):
            term.send(line)
            term.expect(PROMPT, n)
        term.send("/exit")
        assert term.finish() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    out = term.output
    assert "Traceback" not in out and "error" not in out
    assert f"assistant> {r1.text}\n" in out
    assert f"assistant> {r2.text}\n" in out
    assert "(new conversation)" in out
    stats = [tuple(map(int, m.groups())) for m in STATS.finditer(out)]
    # the second turn's prompt is the whole conversation so far; after /reset it is one turn again
    p1, p2 = len(llm.encode_chat([u1])), len(llm.encode_chat(history))
    assert p2 > p1 + len(r1.token_ids) // 2
    assert stats == [(len(r1.token_ids), r1.stats["forward_calls"], p1),
                     (len(r2.token_ids), r2.stats["forward_calls"], p2),
                     (len(r1.token_ids), r1.stats["forward_calls"], p1)]
    assert out.count(f"assistant> {r1.text}\n") == 2  # the same answer once the history is gone


def test_too_long_conversation_and_eof(qwen2_ckpt):
    # 500 new tokens leave no room in the 512-token context after the first turn's prompt
    term = Terminal([sys.executable, "-m", "fastdllm.cli", "chat", "--model", str(qwen2_ckpt),
                     "--max-new-tokens", "500"])
    try:
        term.expect(PROMPT, 1)
        term.send("Hello! " * 3)
        term.expect(PROMPT, 2)
        os.write(term.master, b"\x04")  # Ctrl-D
        assert term.finish() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    out = term.output
    assert "Traceback" not in out
    assert re.search(r"error: the conversation has \d+ tokens .* type /reset", out)


class Recorder:
    def __init__(self):
        self.writes: list[str] = []

    def write(self, s: str) -> None:
        self.writes.append(s)

    def flush(self) -> None:
        pass


def test_answers_stream_in_pieces(qwen2_ckpt):
    from fastdllm.cli.chat import ANSWER, Chat

    llm = LLM.load(qwen2_ckpt)
    params = llm.decode_config(max_new_tokens=24)
    out = Recorder()
    chat = Chat(llm, params, system="Be brief.", show_stats=False, out=out)
    text = chat.answer("Hello! Tell me a story.")
    assert out.writes[0] == ANSWER and out.writes[-1] == "\n"
    pieces = out.writes[1:-1]
    assert len(pieces) > 1 and "".join(pieces) == text  # printed as it became final
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]
    # a trailing U+FFFD may be half a character: held back until the answer is finished
    stream = TextStream(lambda ids: "".join(ids))
    stream.text = "ab"
    assert stream.update(list("abc\ufffd"), finished=False) == "c" and stream.text == "abc"
    assert stream.update(list("abc\ufffd"), finished=True) == "\ufffd"
