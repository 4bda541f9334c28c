"""`beed serve --metrics-port`: Prometheus metrics of a real server, parsed with prometheus_client."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from beectl import AutoDistributedModelForCausalLM
from beectl.local_swarm import LocalSwarm
from tests.conftest import peers_of


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counters_move_after_a_generation(tokenizer):
    port = free_port()
    with LocalSwarm(spans=[(0, 30)], extra_args=["--metrics-port", str(port)]) as swarm:
        before = scrape(port)
        assert before[("beed_sessions", ())] == 0
        assert ("beed_announce_age_seconds", ()) in before
        with AutoDistributedModelForCausalLM.from_pretrained(
            "smollm2-135m", initial_peers=peers_of(swarm)
        ) as model:
            ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
            model.generate(ids, max_new_tokens=8, eos_token_id=None)
        after = scrape(port)
    assert after[("beed_batches_total", ())] >= before[("beed_batches_total", ())] + 8
    assert after[("beed_step_seconds_count", (("kind", "decode"),))] >= 7
    assert after[("beed_step_seconds_count", (("kind", "prefill"),))] >= 1
    assert after[("beed_free_kv_tokens", ())] > 0
