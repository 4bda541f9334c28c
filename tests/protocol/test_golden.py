"""Golden frames: the bytes in docs/protocol.md decode to these messages and, uncompressed, back."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from protocol import (
    Error,
    FrameDecoder,
    Hello,
    Message,
    Push,
    Step,
    StepResult,
    encode_message_bytes,
)
from tests.protocol.test_messages import assert_same_message

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

# (name, message, hex, encoder must reproduce the bytes). Compressed vectors are decode-only:
# another zstd version may compress differently, and any valid zstd frame is acceptable.
GOLDEN: list[tuple[str, Callable[[], Message], str, bool]] = [
    (
        "G1",
        lambda: Hello(
            stream_id=0,
            software_version="beed/0.1.0",
            codecs=("none", "zstd", "planes-zstd"),
            peer_id="peer-a",
            max_frame_bytes=1048576,
            max_streams=8,
        ),
        "4245454401000000990000000000000089a47479706501a973747265616d5f69"
        "6400b070726f746f636f6c5f76657273696f6e01b0736f6674776172655f7665"
        "7273696f6eaa626565642f302e312e30a6636f6465637393a46e6f6e65a47a73"
        "7464ab706c616e65732d7a737464a7706565725f6964a6706565722d61af6d61"
        "785f6672616d655f6279746573ce00100000ab6d61785f73747265616d7308a8"
        "666561747572657390",
        True,
    ),
    (
        "G2",
        lambda: Step(
            5,
            1,
            3,
            torch.tensor([[[1.0, -0.0, math.inf, -2.5]]], dtype=torch.float32),
            position_ids=torch.tensor([[3]], dtype=torch.int64),
        ),
        "4245454401000000610000001800000087a4747970650ca973747265616d5f69"
        "6405a7737465705f696401a8706f736974696f6e03a668696464656e00ac706f"
        "736974696f6e5f69647301a774656e736f72739295a7666c6f61743332930101"
        "0400101095a5696e7436349201010008080000803f000000800000807f000020"
        "c00300000000000000",
        True,
    ),
    (
        "G3",
        lambda: Error(7, 205, "KV cache full", True),
        "42454544010000003a0000000000000085a47479706506a973747265616d5f69"
        "6407a4636f6465cccda76d657373616765ad4b562063616368652066756c6ca9"
        "726574727961626c65c3",
        True,
    ),
    (
        "G4",
        lambda: StepResult(5, 1, torch.tensor([[[1.0, -0.0, 0.5, -2.0]]], dtype=torch.bfloat16)),
        "4245454401000000470000000800000086a4747970650da973747265616d5f69"
        "6405a7737465705f696401a668696464656e00a8647261696e696e67c2a77465"
        "6e736f72739195a862666c6f6174313693010104000808803f0080003f00c0",
        True,
    ),
    (
        "G5",
        lambda: StepResult(9, 2, torch.tensor([[1.0, 1.5, -2.0, 0.25] * 8], dtype=torch.bfloat16)),
        "42454544010000003c0000003f00000085a4747970650da973747265616d5f69"
        "6409a7737465705f696402a668696464656e00a774656e736f72739195a86266"
        "6c6f6174313692012005403f200000001700000080c0008080c0008080c00080"
        "80c0008080c0008080c0008080c0008080c0008028b52ffd2420550000203f3f"
        "c03e0100338e08d87e3965",
        False,
    ),
    (
        "G6",
        lambda: Push(
            3,
            "00112233445566778899aabbccddeeff",
            4,
            7,
            torch.tensor([[[0.5, -1.0]]], dtype=torch.float32),
            next_hops=(
                {
                    "host": "10.0.0.3",
                    "port": 31337,
                    "peer_id": "peer-c",
                    "token": "ffeeddccbbaa99887766554433221100",
                },
            ),
        ),
        "4245454401000000c70000000800000088a4747970650fa973747265616d5f69"
        "6403a5746f6b656ed92030303131323233333434353536363737383839396161"
        "62626363646465656666a7737465705f696404a8706f736974696f6e07a66869"
        "6464656e00a96e6578745f686f70739184a4686f7374a831302e302e302e33a4"
        "706f7274cd7a69a7706565725f6964a6706565722d63a5746f6b656ed9206666"
        "656564646363626261613939383837373636353534343333323231313030a774"
        "656e736f72739195a7666c6f61743332930101020008080000003f000080bf",
        True,
    ),
]


@pytest.mark.parametrize(
    ("name", "make", "hexdata", "both_ways"), GOLDEN, ids=[g[0] for g in GOLDEN]
)
def test_golden_vector(
    name: str, make: Callable[[], Message], hexdata: str, both_ways: bool
) -> None:
    data = bytes.fromhex(hexdata)
    dec = FrameDecoder()
    for i in range(len(data)):
        dec.feed(data[i : i + 1])
    got = dec.next_message()
    assert got is not None, name
    assert_same_message(got, make())
    if both_ways:
        assert encode_message_bytes(make()).hex() == hexdata


def test_docs_carry_the_same_golden_vectors() -> None:
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"^#### (G\d+)\b.*?```hex\n(.*?)```", text, flags=re.M | re.S)
    in_doc = {name: "".join(block.split()) for name, block in blocks}
    assert in_doc == {name: hexdata for name, _, hexdata, _ in GOLDEN}
