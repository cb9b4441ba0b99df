"""`fastdllm chat`: a multi-turn chat in the terminal, streaming each answer as it becomes final.

The conversation is rendered with the checkpoint's chat template every turn. The answer is
decoded with `LLM.stream`, one engine step at a time; after each step, the tokens before the
first [MASK] can no longer change (`Sequence.final_ids`), so that prefix is printed. With block
diffusion the text therefore arrives a few tokens at a time, as blocks and sub-blocks resolve.

Commands: /reset (new conversation), /stats (toggle per-answer statistics), /help, /exit.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from ..errors import FastDLLMError
from ..text_stream import TextStream
from .args import add_decode_args, add_model_args, decode_overrides, load_llm

PROMPT, ANSWER = "you> ", "assistant> "
HELP = "commands: /reset new conversation · /stats toggle statistics · /help · /exit (or Ctrl-D)"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("chat", help="multi-turn chat in the terminal, streaming the answers")
    add_model_args(p)
    add_decode_args(p)
    p.add_argument("--system", default=None, help="a system message that starts every conversation")
    p.add_argument("--stats", action="store_true",
                   help="print statistics after every answer (toggle with /stats)")
    p.set_defaults(func=cmd_chat)


class Chat:
    """One conversation: its messages, and the streaming of each answer."""

    def __init__(self, llm, params, *, system: str | None, show_stats: bool, out: TextIO):
        self.llm, self.params, self.system = llm, params, system
        self.show_stats, self.out = show_stats, out
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def answer(self, user_text: str) -> str | None:
        """Stream the answer to one user turn; the turn joins the history only if it completes."""
        messages = self.messages + [{"role": "user", "content": user_text}]
        try:
            ids = self.llm.encode_chat(messages)
        except FastDLLMError as e:
            if e.field != "prompt" or len(messages) == 1 + bool(self.system):
                raise
            raise FastDLLMError(f"{e}, or type /reset to start a new conversation",
                                field="messages") from None
        room = self.llm.context_length - len(ids)
        if room < self.params.max_new_tokens:
            raise FastDLLMError(
                f"the conversation has {len(ids)} tokens and the model's context is "
                f"{self.llm.context_length}, leaving {max(room, 0)} for an answer of up to "
                f"{self.params.max_new_tokens}; type /reset to start a new conversation"
                + (" (or lower --max-new-tokens)" if room > 0 else ""), field="messages")
        steps = self.llm.stream([ids], config=self.params)
        stream = TextStream(lambda final: self.llm.decode(final) or "")
        self.out.write(ANSWER)
        try:
            for step in steps:
                seq = step.deltas[0].seq
                self._emit(stream.feed(seq))
        except KeyboardInterrupt:
            steps.close()  # frees the sequence's slot
            self.out.write(" [interrupted]\n")
            return None
        text = self.llm.decode(seq.output_ids()) or ""
        self.out.write("\n")
        if self.show_stats:
            s = seq.stats.as_dict()
            self.out.write(f"  [{self.params.mode}] {s['new_tokens']} tokens · {s['forward_calls']} forwards"
                           f" · {s['tokens_per_forward']:.2f} tokens/forward"
                           f" · {s['tokens_per_second']:.1f} tokens/s · prompt {len(ids)} tokens"
                           f" · finish {seq.finish_reason}\n")
        self.out.flush()
        self.messages = messages + [{"role": "assistant", "content": text}]
        return text

    def _emit(self, delta: str) -> None:
        if delta:
            self.out.write(delta)
            self.out.flush()


def cmd_chat(args: argparse.Namespace) -> int:
    llm = load_llm(args)
    if llm.tokenizer is None or not llm.tokenizer.chat_template:
        raise FastDLLMError(f"{llm.model_dir} has no chat template, which chat needs; use "
                            "`fastdllm generate --prompt ...` instead", field="model")
    params = llm.decode_config(**decode_overrides(args))
    chat = Chat(llm, params, system=args.system, show_stats=args.stats, out=sys.stdout)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    desc = (f"diffusion, block {params.block_size}, sub-block {params.sub_block_size}, "
            f"threshold {params.threshold}" if params.diffusion else "autoregressive")
    if params.speculative:
        drafter = llm.draft.model_dir.name if llm.draft else "itself (self-speculative)"
        desc = f"speculative, drafts of {params.draft_length} by {drafter}"
    print(f"fastdllm chat · {llm.model_dir.name} · {desc}\n{HELP}", flush=True)
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            chat.reset()
            print("(new conversation)", flush=True)
        elif cmd == "/stats":
            chat.show_stats = not chat.show_stats
            print(f"(statistics {'on' if chat.show_stats else 'off'})", flush=True)
        elif cmd == "/help":
            print(HELP, flush=True)
        elif cmd.startswith("/") and " " not in cmd:
            print(f"unknown command {cmd}; {HELP}", flush=True)
        else:
            try:
                chat.answer(line)
            except FastDLLMError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
