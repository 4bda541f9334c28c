"""`beectl chat` through a pseudo-terminal (pexpect), over a real 2-server swarm."""

from __future__ import annotations

import re
import sys

import pexpect

from tests.conftest import peers_of
from tests.swarm.test_api import local_answer

TURNS = ["My name is Alice and I live in Paris.", "What city do I live in?"]


def test_two_turns_the_second_from_the_cached_first_then_stop_and_exit(
    swarm2, local_model, tokenizer
):
    child = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "beectl.cli",
            "chat",
            "--initial-peers",
            ",".join(peers_of(swarm2)),
            "--max-new-tokens",
            "24",
            "--verbose",
        ],
        encoding="utf-8",
        timeout=180,
    )
    try:
        child.expect("you> ")
        messages: list[dict[str, str]] = []
        reused = []
        for turn in TURNS:
            child.sendline(turn)
            child.expect(r"bot> (.*?)\r\n\(reused (\d+) cached tokens, sent (\d+)\)")
            answer = child.match.group(1).replace("\r\n", "\n")
            reused.append(int(child.match.group(2)))
            messages.append({"role": "user", "content": turn})
            # The answer equals local transformers' greedy answer to the whole conversation.
            assert answer == local_answer(local_model, tokenizer, messages, 24)
            messages.append({"role": "assistant", "content": answer})
            child.expect("you> ")
        # The second turn sent only its new tokens: the first turn's stayed cached.
        assert reused[0] == 0 and reused[1] > 20
        child.sendline("/reset")
        child.expect(re.escape("(conversation reset)"))
        child.expect("you> ")
        child.sendline("Tell me a long story about a dragon.")
        child.expect("bot> ")
        child.expect(r"\S+ \S+ \S+")  # it is answering: Ctrl-C stops the answer, not the chat
        child.sendintr()
        child.expect(re.escape("(answer stopped)"))
        child.expect("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.terminate(force=True)
