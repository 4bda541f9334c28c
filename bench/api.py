"""`beectl api` under concurrent streaming chat requests, against `beectl generate` alone.

    python bench/api.py                      # 1, 8 and 32 concurrent requests, 32 tokens each
    python bench/api.py --concurrency 1 16 --max-tokens 64

A 2-server swarm of the embedded model on 127.0.0.1 (float32), the API as its own process, and
the real `openai` client (AsyncOpenAI) streaming greedy chat completions. Prints, per
concurrency: median time to first token, tokens/s per request and in total, the total against
one request, and (one request) the API against the Python API's `generate` of the same prompt
in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUESTION = "Explain in a few sentences why the sky is blue."


def baseline(peers: list[str], max_tokens: int, repeats: int) -> float:
    """Tokens/s of one greedy chat generation through the Python API."""
    import torch

    from beectl import AutoDistributedModelForCausalLM

    with AutoDistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=peers) as m:
        tok = m.tokenizer
        ids = tok.apply_chat_template(
            [{"role": "user", "content": QUESTION}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        kw = dict(max_new_tokens=max_tokens, eos_token_id=None)
        m.generate(ids, **{**kw, "max_new_tokens": 4})
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            m.generate(ids, **kw)
            times.append(time.perf_counter() - t0)
        del torch
        return max_tokens / statistics.median(times)


async def one_request(client, max_tokens: int, index: int) -> tuple[float, float, int]:
    """(time to first token, total seconds, completion tokens)."""
    began = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": f"{QUESTION} ({index})"}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if first is None and any(c.delta.content for c in chunk.choices):
            first = time.perf_counter() - began
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - began
    return (first if first is not None else total), total, tokens


async def concurrent(url: str, count: int, max_tokens: int) -> tuple[float, float, float]:
    """(median time to first token, median per-request tok/s, total tok/s)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    await one_request(client, 4, -1)  # warm
    began = time.perf_counter()
    results = await asyncio.gather(*(one_request(client, max_tokens, i) for i in range(count)))
    wall = time.perf_counter() - began
    await client.close()
    ttft = statistics.median(r[0] for r in results)
    per = statistics.median(r[2] / r[1] for r in results)
    return ttft, per, sum(r[2] for r in results) / wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--batch-matmul",
        default="auto",
        choices=["auto", "shared", "per-session"],
        help="the servers' --batch-matmul (auto: per-session in float32)",
    )
    args = parser.parse_args()

    from beectl.local_swarm import LocalSwarm

    with LocalSwarm(num_servers=2, extra_args=["--batch-matmul", args.batch_matmul]) as swarm:
        peers = [f"{h}:{p}" for h, p in swarm.initial_peers]
        base = baseline(peers, args.max_tokens, args.repeats)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "beectl.cli",
                "api",
                "--port",
                "0",
                "--initial-peers",
                ",".join(peers),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().split()[1]
            rows = [
                (c, *asyncio.run(concurrent(url, c, args.max_tokens))) for c in args.concurrency
            ]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(
        f"# 2 servers + API + client on this machine (smollm2-135m float32, greedy); "
        f"{args.max_tokens} tokens per request; servers --batch-matmul {args.batch_matmul}; "
        f"beectl generate alone: {base:.1f} tok/s"
    )
    print(
        "| concurrent | TTFT ms (median) | tok/s per request | tok/s total | total vs 1 | vs generate |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    one = rows[0][3]
    for count, ttft, per, total in rows:
        vs = f"{per / base:.2f}x" if count == 1 else "-"
        print(
            f"| {count} | {1000 * ttft:.0f} | {per:.1f} | {total:.1f} | {total / one:.2f}x | {vs} |"
        )


if __name__ == "__main__":
    main()
