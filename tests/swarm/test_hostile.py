"""Strangers on the network: each attack on a real server is bounded, and an honest client on
another address is still served, with the same text as before the attack.

Attackers connect from other loopback addresses (127.0.0.2, ...): to the server they are other
peers, as they would be on the internet.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import torch

from beectl.local_swarm import LocalSwarm
from beed.models.fingerprint import model_fingerprint
from beed.models.registry import cache_dir
from protocol import encode_message_bytes
from protocol.codecs import CodecPolicy
from protocol.frames import MAGIC, PREFIX
from protocol.messages import (
    Error,
    Forward,
    GetInfo,
    Hello,
    Info,
    OpenSession,
    SessionOpened,
    Step,
)
from tests.conftest import peers_of
from tests.swarm.test_faults import RawPeer, server_info

MAX_TOKENS = 2048
LIMITS = [
    "--hello-timeout",
    "1",
    "--idle-timeout",
    "2",
    "--first-step-timeout",
    "3",
    "--max-connections-per-peer",
    "16",
    "--max-request-tokens",
    str(MAX_TOKENS),
    "--buffer-wait",
    "1",
    "--kv-budget-tokens",
    "4096",
]
PROMPT = "The capital of France is"
GiB = 1 << 30


@pytest.fixture(scope="module")
def swarm():
    with LocalSwarm(spans=[(0, 30)], extra_args=[*LIMITS, "--no-encryption"]) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def fingerprint(model_path):
    return model_fingerprint(model_path, cache_dir() / "fingerprints.json")


@pytest.fixture(scope="module")
def honest_text(swarm):
    return generate(swarm).stdout


def command(swarm, tokens: int) -> list[str]:
    args = ["generate", PROMPT, "--raw", "--max-new-tokens", str(tokens)]
    return [sys.executable, "-m", "beectl.cli", *args, "--initial-peers", peers_of(swarm)[0]]


def generate(swarm, tokens: int = 12) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        command(swarm, tokens),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return result


def start_generate(swarm, tokens: int = 12) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command(swarm, tokens),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, err
    return out


class Attacker(RawPeer):
    """A raw peer from another loopback address, speaking plain TCP (this module's server does
    not encrypt: the attacks here are on the framing, the same code behind TLS)."""

    def __init__(self, address: tuple[str, int], source: str, rcvbuf: int | None = None) -> None:
        from protocol import FrameDecoder

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect: the window it advertises follows it
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((source, 0))
        self.sock.settimeout(10)
        self.sock.connect(address)
        self.decoder = FrameDecoder()


def server_rss(swarm) -> int:
    pid = swarm.servers[0].process.pid
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def info(swarm) -> dict:
    return server_info(swarm.servers[0].address, tls=False)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes sock within `seconds` (whatever it sent before)."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if not sock.recv(1 << 16):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def bomb(tokens: int) -> bytes:
    """A Step of zeros that zstd squeezes to a few hundred bytes."""
    hidden = torch.zeros(1, tokens, 576)
    return encode_message_bytes(Step(7, 1, 0, hidden), CodecPolicy(force="zstd"))


def wrong_model_forward(tokens: int, sid: int) -> bytes:
    """A raw Forward at the size limit that the server decodes, then refuses (203)."""
    return encode_message_bytes(Forward(sid, "f" * 16, 0, 30, torch.randn(1, tokens, 576)))


def test_compression_bombs_are_refused_before_decompression(swarm, honest_text):
    frame = bomb(MAX_TOKENS)  # claims 4.7 MB, sends under 4 KB
    assert len(frame) < 4096
    watcher = RawPeer(swarm.servers[0].address, tls=False)
    watcher.hello()
    slowest = 0.0
    for round_ in range(40):
        attacker = Attacker(swarm.servers[0].address, f"127.0.0.{2 + round_ % 4}")
        attacker.hello()
        attacker.send(frame)
        refused = attacker.read()
        assert isinstance(refused, Error) and refused.code == 109, refused
        assert "max_compression_ratio" in refused.message
        assert closed_within(attacker.sock, 5.0)
        attacker.close()
        began = time.monotonic()
        watcher.send(encode_message_bytes(GetInfo(100 + round_)))
        assert isinstance(watcher.read(), Info)
        slowest = max(slowest, time.monotonic() - began)
    watcher.close()
    # Bombs are refused from their headers: another client's GetInfo is not held up by them
    # (a bound, not a benchmark: milliseconds on loopback; a decompressed bomb took seconds).
    assert slowest < 2.0, slowest
    assert generate(swarm).stdout == honest_text


def test_large_frames_stay_within_the_memory_budget_and_others_are_answered(swarm, honest_text):
    idle_rss = server_rss(swarm)
    attackers = [Attacker(swarm.servers[0].address, f"127.0.0.{10 + i}") for i in range(4)]
    for a in attackers:
        a.hello()
    peak = idle_rss
    watcher = RawPeer(swarm.servers[0].address, tls=False)
    watcher.hello()
    sid = 1
    for round_ in range(10):
        for a in attackers:
            a.send(b"".join(wrong_model_forward(MAX_TOKENS, sid + 2 * k) for k in range(4)))
        sid += 8
        # Another client's GetInfo is answered while the frames are decoded (off the loop).
        watcher.send(encode_message_bytes(GetInfo(100 + round_)))
        assert isinstance(watcher.read(), Info)
        peak = max(peak, server_rss(swarm))
    for a in attackers:
        a.close()
    watcher.close()
    assert peak - idle_rss < GiB, (idle_rss, peak)
    # A frame over the per-connection budget is refused before it is buffered.
    big = Attacker(swarm.servers[0].address, "127.0.0.9")
    big.hello()
    big.send(wrong_model_forward(8 * MAX_TOKENS, 1)[:65536])
    refused = big.read()
    assert isinstance(refused, Error) and refused.code in (111, 113), refused
    big.close()
    for _ in range(50):
        now = info(swarm)
        if now["request_bytes_held"] == 0:
            break
        time.sleep(0.1)
    assert now["request_bytes_held"] == 0
    assert 0 < now["request_bytes_peak"] <= now["request_bytes_budget"]
    assert generate(swarm).stdout == honest_text


def test_idle_and_half_sent_connections_are_closed_and_a_client_still_generates(swarm, honest_text):
    address = swarm.servers[0].address
    hello = encode_message_bytes(Hello())
    big_prefix = PREFIX.pack(MAGIC, 1, 0, 100, 1 << 20)
    kinds = [b"", hello[:7], hello, hello + big_prefix + b"\x80"]
    socks = []
    for i in range(500):
        sock = socket.create_connection(
            address, timeout=10, source_address=(f"127.0.1.{1 + i % 250}", 0)
        )
        sock.sendall(kinds[i % len(kinds)])
        socks.append(sock)
    proc = start_generate(swarm)
    # Deadlines: Hello within 1 s (however it trickles), then 2 s idle at most.
    for sock in socks[:: len(kinds)]:
        sock.sendall(b"B")  # trickling does not extend the Hello deadline
    assert all(closed_within(sock, 15.0) for sock in socks)
    for sock in socks:
        sock.close()
    assert finish(proc) == honest_text
    assert info(swarm)["connections"] <= 2


def test_one_address_cannot_take_every_connection(swarm, honest_text):
    address = swarm.servers[0].address
    socks = [Attacker(address, "127.0.0.20") for _ in range(16)]
    for peer in socks:
        peer.hello()
    extra = Attacker(address, "127.0.0.20")
    refusal = extra.read()  # told why, then closed at once: the address has 16 already
    assert isinstance(refusal, Error) and refusal.code == 208, refusal
    assert "--max-connections-per-peer 16" in refusal.message
    assert closed_within(extra.sock, 5.0)
    assert generate(swarm).stdout == honest_text  # another address is served meanwhile
    assert info(swarm)["connections_refused"] >= 1
    for peer in [*socks, extra]:
        peer.close()


def test_a_session_grabber_is_capped_and_its_reservations_expire(swarm, fingerprint, honest_text):
    grabber = Attacker(swarm.servers[0].address, "127.0.0.30")
    grabber.hello()
    grabber.send(encode_message_bytes(OpenSession(1, fingerprint, 0, 30, max_length=2048)))
    assert isinstance(grabber.read(), SessionOpened)
    grabber.send(encode_message_bytes(OpenSession(3, fingerprint, 0, 30, max_length=64)))
    refused = grabber.read()
    assert isinstance(refused, Error) and refused.code == 208, refused
    assert "max_kv_share_per_peer" in refused.message
    assert generate(swarm).stdout == honest_text  # the other half of the cache is free
    # A session that never steps gives its reservation back (--first-step-timeout 3).
    for _ in range(100):
        if info(swarm)["free_kv_tokens"] == 4096:
            break
        time.sleep(0.1)
    assert info(swarm)["free_kv_tokens"] == 4096
    grabber.close()


def test_huge_forwards_are_bounded_and_do_not_starve_decoding(swarm, fingerprint, honest_text):
    attacker = Attacker(swarm.servers[0].address, "127.0.0.40")
    attacker.hello()
    over = Forward(1, fingerprint, 0, 30, torch.randn(1, MAX_TOKENS + 1, 576))
    attacker.send(encode_message_bytes(over))
    refused = attacker.read()
    assert isinstance(refused, Error) and refused.code == 209, refused
    # Forwards at the limit keep coming while an honest client generates: they run in chunks
    # between its steps, so it finishes (with the same text).
    proc = start_generate(swarm)
    sid = 3
    for _ in range(6):
        hidden = torch.randn(1, MAX_TOKENS, 576)
        attacker.send(encode_message_bytes(Forward(sid, fingerprint, 0, 30, hidden)))
        sid += 2
    assert finish(proc) == honest_text
    attacker.close()


def test_a_peer_that_never_reads_its_answers_gets_no_more_compute(swarm, fingerprint, honest_text):
    """Slowloris with compute: a session pipelines one-token steps into a 4 KB receive buffer
    and reads nothing. The server computes until about --max-unread-kib of answers wait, then
    stops reading that connection; an honest client is served meanwhile."""
    reader = Attacker(swarm.servers[0].address, "127.0.0.50", rcvbuf=4096)
    reader.hello()
    reader.send(encode_message_bytes(OpenSession(1, fingerprint, 0, 30, max_length=512)))
    assert isinstance(reader.read(), SessionOpened)
    before = info(swarm)
    steps = 400  # 2.3 KB answers each: ~900 KB if they were all computed
    reader.send(
        b"".join(
            encode_message_bytes(Step(1, 1 + i, i, torch.randn(1, 1, 576))) for i in range(steps)
        )
    )
    for _ in range(100):
        now = info(swarm)
        if now["reader_waits"] > before["reader_waits"]:
            break
        time.sleep(0.1)
    assert now["reader_waits"] > before["reader_waits"], now
    assert generate(swarm).stdout == honest_text  # served while the reader is held
    computed = info(swarm)["batched_steps"] - before["batched_steps"] - 12  # the honest ones
    assert computed < steps / 2, computed  # ~256 KiB of answers, not all 400
    reader.close()


async def test_records_naming_private_addresses_are_ignored_by_a_public_swarm_client(
    swarm, fingerprint
):
    from beectl.config import ClientConfig
    from beectl.swarm import Swarm

    async def servers(allow: bool | None) -> list:
        client = Swarm(
            ClientConfig(
                initial_peers=tuple(swarm.initial_peers), **{"allow_private_addresses": allow}
            )
        )
        try:
            await client.start()
            return await client.servers(fingerprint, 30)
        finally:
            await client.aclose()

    # Auto: the initial peer is on loopback, so is the swarm: its loopback records are used.
    assert [r.peer_id for r in await servers(None)] == [swarm.servers[0].peer_id]
    # A client of a public swarm (here: told so) ignores them: none is dialled.
    assert await servers(False) == []


def test_dial_policy_refuses_non_public_addresses():
    from beed.net.dial import DialPolicy, is_public

    for host in [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "172.16.5.4",
        "169.254.1.1",
        "100.64.0.1",
        "::1",
        "fd00::1",
        "fe80::1",
        "0.0.0.0",
        "224.0.0.1",
        "::ffff:10.0.0.1",
    ]:
        assert not is_public(host), host
        assert not DialPolicy.for_swarm(["8.8.8.8"]).allows(host), host
        assert DialPolicy.for_swarm(["8.8.8.8"], allow_private=True).allows(host)
    for host in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "example.org"]:
        assert is_public(host) and DialPolicy.for_swarm(["8.8.8.8"]).allows(host)
    assert DialPolicy.for_swarm(["127.0.0.1"]).allows("10.0.0.1")  # a private swarm


async def test_a_hostname_is_checked_by_the_address_it_resolves_to():
    from beed.net.dial import DialPolicy
    from beed.net.stream import open_stream
    from protocol.errors import AddressRefusedError

    with pytest.raises(AddressRefusedError):
        await open_stream("localhost", 9, timeout_s=5.0, policy=DialPolicy(False))
    assert (await DialPolicy.for_swarm_resolved(["localhost"])).allow_private
