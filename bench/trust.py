"""What trust costs on loopback, and how fast a lying server is caught.

    python bench/trust.py                          # batch 1 and 8, 64 new tokens, 5 rounds
    python bench/trust.py --batches 1 --rounds 9 --catch-runs 0

Speed: two swarms of 4 servers each (blocks 0:15 and 15:30, each twice: spot checks need another
server of the same blocks; float32) run side by side, one started with `beed serve
--no-encryption`. Clients generate greedily through them in turns (every setup once per round:
drift of the machine hits all alike); each row is the median of its rounds. Setups: encryption
off / on (TLS 1.3) without spot checks, and on with `verify_rate` 2% and 10% (a new server's
first 2 steps are checked too). Each run is a fresh client timed from its first generate call
(connections, TLS handshakes and the first-step checks included). Ratios against local transformers `generate` (its own process,
same prompts) and against encryption off; the tokens must equal local transformers'.

Catch: a swarm where one server of blocks 0:15 adds noise (1% of the largest value) to every
output and claims 1000x its speed (so routes choose it; tests/hostile_server.py). Per verify
setting, --catch-runs fresh clients each generate until the noisy server is caught (at most 300
tokens); the table gives the server's step at which it was caught.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "30000")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from inference import PROMPT

SPANS = [(0, 15), (15, 30), (0, 15), (15, 30)]
SETUPS = [  # name, swarm, verify_rate, verify_first_steps
    ("off", "plain", 0.0, 0),
    ("on (TLS 1.3)", "tls", 0.0, 0),
    ("on, verify 2%", "tls", 0.02, 2),
    ("on, verify 10%", "tls", 0.10, 2),
]


def local_seconds(path: str, ids: torch.Tensor, mask: torch.Tensor, new: int, rounds: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=4, **kw)
    times, out = [], None
    for _ in range(rounds):
        began = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, **kw)
        times.append(time.perf_counter() - began)
    return statistics.median(times), out


def speed(args, tok, path) -> list[tuple]:
    from beectl import AutoDistributedModelForCausalLM
    from beectl.generation import left_pad
    from beectl.local_swarm import LocalSwarm

    words = PROMPT.split()
    n = args.new_tokens
    swarms = {
        "plain": LocalSwarm(spans=SPANS, extra_args=["--no-encryption"]),
        "tls": LocalSwarm(spans=SPANS),
    }
    rows = []
    with swarms["plain"], swarms["tls"]:
        for batch in [int(b) for b in args.batches.split(",")]:
            # Rows of different lengths: left padding, as a batch of users would send.
            texts = [" ".join(words[: len(words) - 3 * i]) for i in range(batch)]
            ids, mask = left_pad([tok(t).input_ids for t in texts], 0)
            local_s, local_out = local_seconds(path, ids, mask, n, args.rounds)
            kw = dict(eos_token_id=None, pad_token_id=0, speculate="off")
            times: dict[str, list[float]] = {s[0]: [] for s in SETUPS}
            same = {s[0]: True for s in SETUPS}
            checked = {s[0]: 0 for s in SETUPS}
            for _ in range(args.rounds):
                for name, swarm, rate, first in SETUPS:
                    # A fresh client each round: its servers are new, as for a new user.
                    peers = [f"{h}:{p}" for h, p in swarms[swarm].initial_peers]
                    with AutoDistributedModelForCausalLM.from_pretrained(
                        "smollm2-135m",
                        initial_peers=peers,
                        verify_rate=rate,
                        verify_first_steps=first,
                    ) as model:
                        # Timed from the first call: connecting (TLS handshakes) and a new
                        # server's first-step checks are part of what a new client pays.
                        began = time.perf_counter()
                        out = model.generate(ids, mask, max_new_tokens=n, **kw)
                        times[name].append(time.perf_counter() - began)
                        checked[name] += model.verification.checked
                    same[name] &= torch.equal(out, local_out)
            rows.append((batch, "local transformers", local_s, local_s, None, True, 0))
            off_s = statistics.median(times["off"])
            for name, *_ in SETUPS:
                median = statistics.median(times[name])
                rows.append(
                    (batch, name, median, local_s, off_s, same[name], checked[name] / args.rounds)
                )
            print(f"# batch {batch} done", file=sys.stderr, flush=True)
    return rows


def catch(args, tok) -> list[tuple]:
    from beectl import AutoDistributedModelForCausalLM
    from beectl.local_swarm import LocalSwarm

    ids = tok(PROMPT, return_tensors="pt").input_ids
    results = []
    with LocalSwarm(spans=[(0, 15), (15, 30)]) as swarm:
        noisy = swarm.add_server(
            "0:15",
            name="noisy",
            module="tests.hostile_server",
            extra_args=["--noise", "0.01", "--claim-speed", "1000"],
        )
        noisy.wait_ready(120)
        peers = [f"{h}:{p}" for h, p in swarm.initial_peers]
        for name, rate, first in (
            ("default: 2% + first 2 steps", 0.02, 2),
            ("2%, no first-step checks", 0.02, 0),
            ("10%, no first-step checks", 0.10, 0),
        ):
            steps = []
            for _ in range(args.catch_runs):
                with AutoDistributedModelForCausalLM.from_pretrained(
                    "smollm2-135m", initial_peers=peers, verify_rate=rate, verify_first_steps=first
                ) as model:
                    with model.inference_session(max_length=ids.shape[1] + 310) as session:
                        out = ids
                        while not model.verification.mismatches and session.position < 300:
                            out = model.generate(
                                out,
                                max_new_tokens=10,
                                eos_token_id=None,
                                speculate="off",
                                session=session,
                            )
                    caught = model.verification.caught_at
                    steps.append(caught[0] if caught else None)
            results.append((name, steps))
            print(f"# catch {name}: {steps}", file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--catch-runs", type=int, default=20)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from beed.models.registry import resolve_model

    path = str(resolve_model("smollm2-135m").path)
    tok = AutoTokenizer.from_pretrained(path)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}; smollm2-135m float32, greedy, {args.new_tokens} new tokens per "
        f"row, median of {args.rounds} rounds (setups in turn)",
        flush=True,
    )
    rows = speed(args, tok, path) if args.rounds else []
    caught = catch(args, tok) if args.catch_runs else []
    if rows:
        print()
        print(
            "| batch | encryption, checks | tok/s | vs local | vs off | checked steps | same tokens |"
        )
        print("|---:|---|---:|---:|---:|---:|---|")
        for batch, name, seconds, local_s, off_s, same, checked in rows:
            tps = batch * args.new_tokens / seconds
            vs_off = "-" if off_s is None else f"{off_s / seconds:.3f}x"
            print(
                f"| {batch} | {name} | {tps:.2f} | {local_s / seconds:.2f}x | {vs_off} | "
                f"{checked:.1f} | {'yes' if same else 'NO'} |"
            )
    if caught:
        print()
        print("| checks | runs | caught | step caught at: median | max | all |")
        print("|---|---:|---:|---:|---:|---|")
        for name, steps in caught:
            found = [s for s in steps if s is not None]
            median = f"{statistics.median(found):.0f}" if found else "-"
            worst = f"{max(found)}" if found else "-"
            shown = ",".join("-" if s is None else str(s) for s in steps)
            print(f"| {name} | {len(steps)} | {len(found)} | {median} | {worst} | {shown} |")


if __name__ == "__main__":
    main()
