"""`python -m bench.profiled_server serve ...`: `beed serve ...` with a sampling profiler
(bench/sampler.py). SIGUSR1 clears its counts, SIGUSR2 appends its report to
$BEED_PROFILE_DIR/server-<pid>.txt (default /tmp) and clears them."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from bench.sampler import Sampler


def main() -> None:
    sampler = Sampler()
    out = Path(os.environ.get("BEED_PROFILE_DIR", "/tmp")) / f"server-{os.getpid()}.txt"

    def dump(*_: object) -> None:
        with out.open("a") as f:
            f.write(f"# beed {' '.join(sys.argv[1:])}\n{sampler.report()}\n\n")
        sampler.reset()

    signal.signal(signal.SIGUSR1, lambda *_: sampler.reset())
    signal.signal(signal.SIGUSR2, dump)
    sampler.start()
    from beed.cli import main as beed_main

    beed_main()


if __name__ == "__main__":
    main()
