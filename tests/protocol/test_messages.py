"""Every message type round-trips; Hello negotiation; Error frames map back to the error tree."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
import torch

from protocol import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Ack,
    Backward,
    BackwardResult,
    BadRequestError,
    BeeError,
    Close,
    Error,
    Forward,
    ForwardResult,
    FrameDecoder,
    GetInfo,
    Hello,
    Info,
    MalformedHeaderError,
    Message,
    OpenSession,
    Ping,
    Pong,
    Push,
    RemoteError,
    ServerBusyError,
    SessionOpened,
    Step,
    StepResult,
    TooManyStreamsError,
    Truncate,
    UnknownMessageTypeError,
    UnsupportedVersionError,
    encode_message,
    encode_message_bytes,
    error_class_for_code,
    negotiate,
)
from protocol.errors import NoRouteError
from protocol.frames import MAGIC, PREFIX
from tests.protocol.helpers import assert_bit_exact

H = torch.randn(1, 3, 8)
MASK = torch.ones(1, 3, dtype=torch.bool)
POS = torch.arange(3, dtype=torch.int64)[None]

EXAMPLES: list[Message] = [
    Hello(software_version="beed 0.1.0", peer_id="12D3Koo", features=("push",)),
    Ping(0, nonce=42),
    Pong(0, nonce=42),
    GetInfo(1),
    Info(1, {"span": [0, 15], "throughput": 12.5, "name": "x", "nested": {"a": [1, None]}}),
    Error(3, 205, "KV cache full", True),
    Ack(5),
    OpenSession(7, "sha256:abcd", 0, 15, 2048, batch_size=2, timeout_s=30.0),
    OpenSession(8, "sha256:abcd", 0, 15, 2048, push_token="ab" * 16),
    SessionOpened(7, 0, 15, 2048),
    Step(7, 1, 0, H, attention_mask=MASK, position_ids=POS),
    Step(7, 2, 3, H[:, :1]),
    Step(7, 3, 4, H[:, :1], next_hops=({"host": "h", "port": 1, "peer_id": "p", "token": "t"},)),
    StepResult(7, 1, H),
    StepResult(7, 3, H, push_error="push to h:1 failed: refused"),
    Truncate(7, 2),
    Push(9, "0f" * 16, 1, 0, H, position_ids=POS),
    Push(
        9,
        "0f" * 16,
        2,
        3,
        H,
        next_hops=({"host": "10.0.0.2", "port": 31337, "peer_id": "Qm", "token": "ab" * 16},),
    ),
    Close(7),
    Forward(11, "sha256:abcd", 3, 6, H, attention_mask=MASK),
    ForwardResult(11, H),
    Backward(13, "sha256:abcd", 3, 6, H, H * 2),
    BackwardResult(13, H * 3),
]


def assert_same_message(got: Message, want: Message) -> None:
    assert type(got) is type(want)
    for f in dataclasses.fields(want):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor)
            assert_bit_exact(a, b)
        else:
            assert a == b, f.name
            assert type(a) is type(b), f.name


def test_every_message_type_has_an_example() -> None:
    assert {type(m) for m in EXAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_message_roundtrip(msg: Message) -> None:
    dec = FrameDecoder()
    for buf in encode_message(msg):
        dec.feed(buf)
    got = dec.next_message()
    assert got is not None
    assert_same_message(got, msg)
    assert dec.next_message() is None
    assert dec.buffered_bytes == 0


def test_many_messages_one_byte_at_a_time() -> None:
    data = b"".join(encode_message_bytes(m) for m in EXAMPLES)
    dec = FrameDecoder()
    got: list[Message] = []
    for i in range(len(data)):
        dec.feed(data[i : i + 1])
        while (msg := dec.next_message()) is not None:
            got.append(msg)
    assert len(got) == len(EXAMPLES)
    for a, b in zip(got, EXAMPLES, strict=True):
        assert_same_message(a, b)


def test_many_messages_in_one_feed() -> None:
    dec = FrameDecoder()
    dec.feed(b"".join(encode_message_bytes(m) for m in EXAMPLES))
    got = []
    while (msg := dec.next_message()) is not None:
        got.append(msg)
    assert [type(m) for m in got] == [type(m) for m in EXAMPLES]


def raw_frame(header: dict[str, object], payload: bytes = b"") -> bytes:
    packed = msgpack.packb(header)
    return PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, len(packed), len(payload)) + packed + payload


def decode_one(data: bytes) -> Message | None:
    dec = FrameDecoder()
    dec.feed(data)
    return dec.next_message()


def test_unknown_header_keys_are_ignored_and_optional_fields_default() -> None:
    msg = decode_one(
        raw_frame(
            {
                "type": 10,
                "stream_id": 3,
                "model_fingerprint": "f",
                "span_start": 0,
                "span_end": 2,
                "max_length": 64,
                "from_the_future": [1, 2, 3],
            }
        )
    )
    assert msg == OpenSession(3, "f", 0, 2, 64)


def test_missing_required_field_is_malformed() -> None:
    with pytest.raises(MalformedHeaderError, match="lacks field 'position'"):
        decode_one(raw_frame({"type": 14, "stream_id": 3}))


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ({"type": 14, "stream_id": 3, "position": "2"}, "Truncate.position must be int"),
        ({"type": 14, "stream_id": 3, "position": True}, "Truncate.position must be int"),
        ({"type": 6, "stream_id": 3, "code": 1, "message": 5}, "Error.message must be str"),
        ({"type": 1, "stream_id": 0, "codecs": ["zstd", 1]}, "Hello.codecs must be tuple"),
        ({"type": 5, "stream_id": 0, "info": [1]}, "Info.info must be dict"),
        ({"type": 13, "stream_id": 1, "step_id": 1, "hidden": 0}, "StepResult.hidden must be"),
        ({"type": 13, "stream_id": -1}, "'stream_id' must be an integer"),
        ({"type": "step", "stream_id": 1}, "'type' must be an integer"),
    ],
)
def test_ill_typed_fields_are_malformed(header: dict[str, object], match: str) -> None:
    with pytest.raises(MalformedHeaderError, match=match):
        decode_one(raw_frame(header))


def test_float_fields_accept_integers() -> None:
    msg = decode_one(
        raw_frame(
            {
                "type": 10,
                "stream_id": 3,
                "model_fingerprint": "f",
                "span_start": 0,
                "span_end": 2,
                "max_length": 64,
                "timeout_s": 5,
            }
        )
    )
    assert isinstance(msg, OpenSession)
    assert msg.timeout_s == 5.0 and type(msg.timeout_s) is float


def test_unknown_message_type() -> None:
    dec = FrameDecoder()
    dec.feed(raw_frame({"type": 99, "stream_id": 1}) + encode_message_bytes(Ack(1)))
    with pytest.raises(UnknownMessageTypeError, match="unknown message type 99"):
        dec.next_message()
    assert dec.next_message() == Ack(1)  # framing is intact: only that frame is rejected


# --- Hello ----------------------------------------------------------------------------------------


def test_negotiate_intersects_codecs_in_local_order() -> None:
    local = Hello(codecs=("planes-zstd", "zstd", "lz4", "none"))
    remote = Hello(codecs=("lz4", "planes-zstd", "brotli"))
    assert negotiate(local, remote) == (PROTOCOL_VERSION, ("none", "planes-zstd", "lz4"))


def test_negotiate_rejects_other_versions() -> None:
    with pytest.raises(UnsupportedVersionError, match="peer speaks protocol version 2"):
        negotiate(Hello(), Hello(protocol_version=2))


# --- Error frames ---------------------------------------------------------------------------------


def test_error_frame_maps_back_to_the_error_class() -> None:
    frame = Error.from_exception(4, ServerBusyError("KV cache full"))
    assert frame == Error(4, 205, "KV cache full", True)
    exc = frame.to_exception()
    assert type(exc) is ServerBusyError and exc.message == "KV cache full"
    exc2 = Error.from_exception(0, TooManyStreamsError("too many")).to_exception()
    assert type(exc2) is TooManyStreamsError and exc2.retryable


def test_unknown_codes_become_remote_errors() -> None:
    exc = Error(4, 777, "new kind of failure", True).to_exception()
    assert isinstance(exc, RemoteError)
    assert (exc.remote_code, exc.message, exc.is_retryable) == (777, "new kind of failure", True)
    again = Error.from_exception(5, exc)
    assert (again.code, again.retryable) == (777, True)


def test_client_codes_never_map_from_the_wire() -> None:
    assert error_class_for_code(NoRouteError.code) is None
    assert error_class_for_code(202) is BadRequestError
    assert error_class_for_code(0) is None


def test_error_codes_are_unique_and_documented() -> None:
    import protocol.errors as errors_module

    doc = errors_module.__doc__ or ""
    seen: dict[int, str] = {}
    for name in dir(errors_module):
        obj = getattr(errors_module, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, BeeError)
            and obj not in (BeeError, RemoteError)
        ):
            assert obj.code not in seen, (name, seen.get(obj.code))
            seen[obj.code] = name
            assert name in doc and str(obj.code) in doc, name
