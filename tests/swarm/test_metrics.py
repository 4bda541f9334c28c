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
            model.generate(ids, max_new_tokens=8, eos_token_id=None, speculate="off")
        # A request for blocks this server does not have gets an Error (202) it counts.
        from beed.models.fingerprint import model_fingerprint
        from beed.models.registry import cache_dir, resolve_model
        from protocol import encode_message_bytes
        from protocol.messages import Error, OpenSession
        from tests.swarm.test_faults import RawPeer

        path = resolve_model("smollm2-135m").path
        peer = RawPeer(swarm.servers[0].address)
        try:
            peer.hello()
            fp = model_fingerprint(path, cache_dir() / "fingerprints.json")
            peer.send(encode_message_bytes(OpenSession(1, fp, 0, 31, max_length=8)))
            refusal = peer.read()
        finally:
            peer.close()
        assert isinstance(refusal, Error)
        after = scrape(port)
    assert after[("beed_errors_sent_total", (("code", str(refusal.code)),))] >= 1
    assert after[("beed_batches_total", ())] >= before[("beed_batches_total", ())] + 8
    assert after[("beed_step_seconds_count", (("kind", "decode"),))] >= 7
    assert after[("beed_step_seconds_count", (("kind", "prefill"),))] >= 1
    assert after[("beed_free_kv_tokens", ())] > 0
    # Hidden states in (prompt, then one token per step) and out, float32 of width 576.
    least = (4 + 7) * 576 * 4
    for direction in ("received", "sent"):
        raw = wire = 0.0
        for (name, labels), value in after.items():
            if name == "beed_tensor_bytes_total" and ("direction", direction) in labels:
                if ("size", "raw") in labels:
                    raw += value
                else:
                    wire += value
        assert raw >= least, (direction, raw)
        assert 0 < wire <= raw


def test_a_bootstrap_node_exports_its_dht_counters(tmp_path):
    import os

    from beectl.local_swarm import Daemon

    port = free_port()
    node = Daemon(
        "bootstrap",
        ["bootstrap", "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(port)],
        tmp_path / "log",
    )
    node.start(dict(os.environ))
    try:
        node.wait_ready(60)
        before = scrape(port)
        assert before[("beed_dht_contacts", ())] == 0
        # A peer that asks this node something is counted.
        from beectl.config import ClientConfig
        from beectl.swarm import Swarm

        peers = node.ready_line.split()[-1]
        host, _, dht_port = peers.rpartition(":")

        async def ask() -> None:
            client = Swarm(ClientConfig(initial_peers=((host, int(dht_port)),)))
            await client.start()
            await client.models()
            await client.aclose()

        import asyncio

        asyncio.run(ask())
        after = scrape(port)
        assert after[("beed_dht_handled_total", ())] > before.get(("beed_dht_handled_total", ()), 0)
        assert ("beed_dht_entries", ()) in after
    finally:
        assert node.process is not None
        node.process.terminate()
        node.process.wait(timeout=30)
