"""A test-only wrapper of the real server that lies: `python -m tests.hostile_server serve ...
[--noise S] [--claim-speed X]` runs `beed serve ...` with every step's output pushed by noise of
S times its largest value, and/or its measured throughput announced X times too high."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("GOMP_SPINCOUNT", "30000")

import torch

from beed.server import server as server_module
from beed.server import service
from beed.server.probe import measure_block_throughput


def main() -> None:
    args, values = [], {"--noise": 0.0, "--claim-speed": 0.0}
    rest = sys.argv[1:]
    while rest:  # this wrapper's flags may stand anywhere; the others go to beed
        if rest[0] in values and len(rest) > 1:
            values[rest[0]] = float(rest[1])
            rest = rest[2:]
        else:
            args.append(rest.pop(0))
    noise, claim = values["--noise"], values["--claim-speed"]
    if noise:
        honest = service.SessionService._run

        async def noisy(self, session, msg):  # type: ignore[no-untyped-def]
            out = await honest(self, session, msg)
            push = noise * out.float().abs().max() * torch.randn(out.shape)
            return (out.float() + push).to(out.dtype)

        service.SessionService._run = noisy  # type: ignore[method-assign]
    if claim:
        server_module.measure_block_throughput = lambda backend: (
            claim * measure_block_throughput(backend)
        )
    from beed.cli import main as beed_main

    sys.argv = ["beed", *args]
    beed_main()


if __name__ == "__main__":
    main()
