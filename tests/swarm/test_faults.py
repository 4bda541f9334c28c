"""A misbehaving raw-socket peer never crashes a server nor disturbs other connections."""

from __future__ import annotations

import socket
import ssl
import time

import msgpack
import pytest
import torch

from beed.models.fingerprint import model_fingerprint
from beed.models.registry import cache_dir
from beed.net.tls import client_context
from protocol import FrameDecoder, encode_message_bytes
from protocol.frames import MAGIC, PREFIX
from protocol.messages import (
    Error,
    GetInfo,
    Hello,
    Info,
    OpenSession,
    Ping,
    Pong,
    SessionOpened,
    Step,
    StepResult,
)


class RawPeer:
    """A blocking socket speaking (or not) our framing; inside TLS (as servers speak by
    default) unless `tls` is False."""

    def __init__(self, address: tuple[str, int], tls: bool = True) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        if tls:
            self.sock = client_context().wrap_socket(self.sock)
        self.decoder = FrameDecoder()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self) -> Hello:
        self.send(encode_message_bytes(Hello()))
        reply = self.read()
        assert isinstance(reply, Hello)
        return reply

    def read(self):
        """The next frame other than a Ping; Pings (link probes the server may send at any
        time, docs/protocol.md §5) are answered as the spec requires."""
        deadline = time.monotonic() + 10
        while True:
            msg = self.decoder.next_message()
            if isinstance(msg, Ping):
                self.send(encode_message_bytes(Pong(0, msg.nonce)))
                continue
            if msg is not None:
                return msg
            assert time.monotonic() < deadline
            try:
                data = self.sock.recv(1 << 16)
            except ssl.SSLEOFError:  # the server closed without TLS's close_notify
                data = b""
            if not data:
                return None
            self.decoder.feed(data)

    def closed_by_peer(self) -> bool:
        """Read (and drop) until the server closes; after `sock.shutdown` a TLS socket reads
        the raw records, which are not frames."""
        self.sock.settimeout(10)
        try:
            while self.sock.recv(1 << 16):
                pass
        except (ConnectionResetError, ssl.SSLEOFError):
            pass
        return True

    def close(self) -> None:
        self.sock.close()


def server_info(address: tuple[str, int], tls: bool = True) -> dict:
    """A server's GetInfo answer, over a connection of its own."""
    peer = RawPeer(address, tls)
    try:
        peer.hello()
        peer.send(encode_message_bytes(GetInfo(1)))
        reply = peer.read()
        assert isinstance(reply, Info)
        return reply.info
    finally:
        peer.close()


def raw_frame(header: dict) -> bytes:
    packed = msgpack.packb(header)
    return PREFIX.pack(MAGIC, 1, 0, len(packed), 0) + packed


@pytest.fixture
def server(swarm2):
    return swarm2.servers[0]


def assert_serves(server, model_path) -> None:
    """A fresh connection still runs a real step."""
    fingerprint = model_fingerprint(model_path, cache_dir() / "fingerprints.json")
    peer = RawPeer(server.address)
    try:
        peer.hello()
        peer.send(encode_message_bytes(OpenSession(1, fingerprint, 0, 15, max_length=8)))
        assert isinstance(peer.read(), SessionOpened)
        peer.send(encode_message_bytes(Step(1, 1, 0, torch.randn(1, 2, 576))))
        reply = peer.read()
        assert isinstance(reply, StepResult) and reply.hidden.shape == (1, 2, 576)
    finally:
        peer.close()


def expect_error_then_close(peer: RawPeer, code: int) -> None:
    reply = peer.read()
    assert isinstance(reply, Error) and reply.stream_id == 0 and reply.code == code, reply
    assert peer.closed_by_peer()


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 101),  # not our protocol at all
        (PREFIX.pack(MAGIC, 7, 0, 10, 0) + bytes(10), 102),  # another protocol version
        (PREFIX.pack(MAGIC, 1, 0, 5, 1 << 30) + b"xxxxx", 111),  # claims a 1 GiB frame
        (PREFIX.pack(MAGIC, 1, 0, 9, 0) + b"\xc1" * 9, 104),  # header is not msgpack
    ],
)
def test_garbage_gets_an_error_and_only_that_connection_closes(server, model_path, payload, code):
    bystander = RawPeer(server.address)
    bystander.hello()
    peer = RawPeer(server.address)
    peer.send(payload)
    expect_error_then_close(peer, code)
    bystander.send(encode_message_bytes(Ping(0, 7)))
    assert bystander.read() == Pong(0, 7)
    bystander.close()
    assert_serves(server, model_path)


def test_first_frame_must_be_hello(server):
    peer = RawPeer(server.address)
    peer.send(encode_message_bytes(GetInfo(1)))
    expect_error_then_close(peer, 116)


def test_unknown_message_type_is_refused_on_its_stream(server):
    peer = RawPeer(server.address)
    peer.hello()
    peer.send(raw_frame({"type": 99, "stream_id": 5}))
    reply = peer.read()
    assert isinstance(reply, Error) and reply.stream_id == 5 and reply.code == 105
    peer.send(encode_message_bytes(GetInfo(6)))
    assert isinstance(peer.read(), Info)
    peer.close()


def test_truncated_frames_and_abrupt_disconnects(server, model_path):
    frame = encode_message_bytes(Step(1, 1, 0, torch.randn(1, 4, 576)))
    for cut in (3, 20, len(frame) - 1):
        peer = RawPeer(server.address)
        peer.hello()
        peer.send(frame[:cut])
        peer.sock.shutdown(socket.SHUT_WR)
        peer.closed_by_peer()
        peer.close()
    assert_serves(server, model_path)


def test_stream_limit_refuses_one_more_and_keeps_the_connection(server, model_path):
    fingerprint = model_fingerprint(model_path, cache_dir() / "fingerprints.json")
    peer = RawPeer(server.address)
    limit = peer.hello().max_streams
    for sid in range(1, limit + 1):
        peer.send(encode_message_bytes(OpenSession(sid, fingerprint, 0, 15, max_length=1)))
    replies = [peer.read() for _ in range(limit)]
    assert all(isinstance(r, SessionOpened) for r in replies)
    peer.send(encode_message_bytes(OpenSession(limit + 1, fingerprint, 0, 15, max_length=1)))
    refused = peer.read()
    assert isinstance(refused, Error) and refused.code == 115 and refused.retryable
    peer.send(encode_message_bytes(Ping(0, 1)))
    assert isinstance(peer.read(), Pong)
    # Reusing an open stream id is a protocol violation.
    peer.send(encode_message_bytes(OpenSession(1, fingerprint, 0, 15, max_length=1)))
    expect_error_then_close(peer, 116)
    peer.close()
