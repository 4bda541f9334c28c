"""Speculative decoding through emulated links: tokens/s with speculation off, auto, fixed, tree.

    python bench/speculative.py                          # RTT 0 and 100 ms, batch 1 and 8
    python bench/speculative.py --rtts 100 --batches 1 --new-tokens 48
    python bench/speculative.py --modes 'off,tree 4x3'  # some modes only

Three servers (blocks 0:10, 10:20, 20:30) behind the link emulator of bench/wan.py (they
announce 127.0.0.2; every client->server and server->server hop crosses a link of the given
round trip, 1 Gbit/s), push on. Per task, RTT and batch size, one greedy generation per
speculation mode after a warm-up: tokens/s (all new tokens over the whole generation, prefill
included), drafted and accepted tokens, the ratio to speculation off in the same run, and whether
the tokens equal those of speculation off (they must). Tasks: `rewrite` (the answer repeats a
given paragraph: drafts from prompt lookup help), `code` (continue a repetitive function) and
`chat` (an open question: drafts rarely help). Batch 8 runs 8 different prompts of the task.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from linkemu import LinkEmulatorProcess
from wan import BeedSwarm, link_for, proxy_maps

PARAGRAPHS = [
    "The library opens at nine in the morning and closes at six in the evening. Members may "
    "borrow up to five books at a time for three weeks, and renew them twice online.",
    "Our team meets every Monday to plan the week. Each person reports what they finished, what "
    "they will do next and what is blocking them, and the meeting ends within twenty minutes.",
    "The recipe needs two cups of flour, one cup of sugar, three eggs and a spoon of butter. Mix "
    "them well, pour the batter into a pan and bake it for thirty minutes.",
    "Trains to the airport leave every fifteen minutes from platform four. The journey takes "
    "twenty-five minutes and tickets can be bought from the machines or on the train.",
]
CODE = [
    "def add(a, b):\n    return a + b\n\n\ndef subtract(a, b):\n    return a - b\n\n\n"
    "def multiply(a, b):\n    return a * b\n\n\ndef ",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "    def __add__(self, other):\n        return Point(self.x + other.x, self.y + other.y)\n\n"
    "    def __sub__(self, other):\n",
]
CHAT = [
    "What should I pack for a weekend of hiking in the mountains?",
    "Give me three ideas for a birthday present for my sister.",
    "Why do cats purr?",
    "How do I start learning to play the guitar?",
]
MODES = {"off": "off", "auto": "auto", "fixed 6": "6", "tree 4x3": "4x3"}


def prompts(task: str, batch: int) -> list[tuple[str, bool]]:
    """(text, whether it goes through the chat template) for each row."""
    if task == "rewrite":
        rows = [(f"Repeat this paragraph word for word:\n\n{p}", True) for p in PARAGRAPHS]
    elif task == "code":
        rows = [(c, False) for c in CODE]
    else:
        rows = [(c, True) for c in CHAT]
    return [rows[i % len(rows)] for i in range(batch)]


def encode(tokenizer, rows: list[tuple[str, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
    from beectl.generation import left_pad

    ids = []
    for text, chat in rows:
        if chat:
            enc = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
            )
            ids.append(list(enc["input_ids"]))
        else:
            ids.append(list(tokenizer(text).input_ids))
    return left_pad(ids, 0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rtts", default="0,100", help="round trip times, ms")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--tasks", default="rewrite,code,chat")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--modes", default=",".join(MODES), help="of: " + ", ".join(MODES))
    args = parser.parse_args()
    from beectl import AutoDistributedModelForCausalLM

    log_dir = Path(tempfile.mkdtemp(prefix="beed-spec-"))
    swarm = BeedSwarm("smollm2-135m", "float32", ["--num-threads", "1"], log_dir)
    swarm.start()
    results = []
    try:
        for rtt in [float(r) for r in args.rtts.split(",")]:
            emu = LinkEmulatorProcess(proxy_maps(swarm.ports), link_for(rtt, 1000))
            with emu:
                model = AutoDistributedModelForCausalLM.from_pretrained(
                    "smollm2-135m", initial_peers=[swarm.initial_peers]
                )
                try:
                    for task in args.tasks.split(","):
                        for batch in [int(b) for b in args.batches.split(",")]:
                            ids, mask = encode(model.tokenizer, prompts(task, batch))
                            kw = dict(
                                eos_token_id=None, pad_token_id=0, return_dict_in_generate=True
                            )
                            model.generate(ids, mask, max_new_tokens=4, speculate="off", **kw)
                            base_tokens = None
                            for name in args.modes.split(","):
                                value = MODES[name]
                                began = time.perf_counter()
                                out = model.generate(
                                    ids, mask, max_new_tokens=args.new_tokens, speculate=value, **kw
                                )
                                seconds = time.perf_counter() - began
                                new = out.sequences[:, ids.shape[1] :]
                                if base_tokens is None:
                                    base_tokens = new
                                tps = batch * args.new_tokens / seconds
                                s = out.speculation
                                results.append(
                                    (
                                        rtt,
                                        task,
                                        batch,
                                        name,
                                        tps,
                                        s.proposed,
                                        s.accepted,
                                        torch.equal(new, base_tokens),
                                    )
                                )
                                print(results[-1], file=sys.stderr, flush=True)
                finally:
                    model.close()
    finally:
        swarm.stop()
    print(
        f"# 3 servers (10 blocks each, float32, push) behind emulated links, smollm2-135m greedy, "
        f"{args.new_tokens} new tokens per row; speculation by prompt lookup"
    )
    print(
        "| RTT ms | task | batch | speculation | tok/s | drafted | accepted | vs off | same tokens |"
    )
    print("|---:|---|---:|---|---:|---:|---:|---:|---|")
    off = {(r[0], r[1], r[2]): r[4] for r in results if r[3] == "off"}
    for rtt, task, batch, name, tps, proposed, accepted, same in results:
        ratio = tps / off[(rtt, task, batch)]
        print(
            f"| {rtt:.0f} | {task} | {batch} | {name} | {tps:.1f} | {proposed} | {accepted} | "
            f"{ratio:.2f}x | {'yes' if same else 'NO'} |"
        )


if __name__ == "__main__":
    main()
