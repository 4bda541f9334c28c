"""A wall-clock sampling profiler for beed's processes (bench only): where every thread is.

py-spy is not on the GPU machine and cProfile sees one thread and slows what it sees, so this
samples `sys._current_frames()` every `interval_s` from a thread of its own and counts, per
thread, the innermost frame ("self") and every function on the stack ("total"). An event loop
waiting in its selector and a compute thread waiting for work show up as such, so a report says
how busy each thread was and in what.

    sampler = Sampler(); sampler.start(); ...; print(sampler.report())

`python -m bench.profiled_server serve ...` runs a daemon with one: SIGUSR1 clears the counts
(say, after warm-up), SIGUSR2 writes the report to $BEED_PROFILE_DIR/server-<pid>.txt.
"""

from __future__ import annotations

import collections
import sys
import threading
import time

# Innermost frames that mean "waiting": a thread pool's idle worker, a lock or sleep, and an
# event loop inside uvloop's C run loop (its callbacks show as Python frames above these).
IDLE = ("select", "poll", "wait", "_worker", "acquire", "sleep", "run_forever", "run")


def _where(frame) -> str:  # type: ignore[no-untyped-def]
    code = frame.f_code
    name = code.co_filename.rsplit("/", 2)
    return f"{'/'.join(name[-2:])}:{code.co_name}:{frame.f_lineno}"


def _function(frame) -> str:  # type: ignore[no-untyped-def]
    code = frame.f_code
    return f"{'/'.join(code.co_filename.rsplit('/', 2)[-2:])}:{code.co_name}"


class Sampler:
    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reset()

    def reset(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self.samples: collections.Counter[str] = collections.Counter()
            self.self_: dict[str, collections.Counter[str]] = collections.defaultdict(
                collections.Counter
            )
            self.total: dict[str, collections.Counter[str]] = collections.defaultdict(
                collections.Counter
            )
            self.started = time.perf_counter()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        own = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            names = {t.ident: t.name for t in threading.enumerate()}
            frames = sys._current_frames()
            with self._lock:
                for ident, frame in frames.items():
                    if ident == own:
                        continue
                    thread = names.get(ident, str(ident))
                    self.samples[thread] += 1
                    self.self_[thread][_where(frame)] += 1
                    seen = set()
                    f = frame
                    while f is not None:
                        fn = _function(f)
                        if fn not in seen:
                            seen.add(fn)
                            self.total[thread][fn] += 1
                        f = f.f_back

    def report(self, top: int = 25) -> str:
        with self._lock:
            lines = [f"# {time.perf_counter() - self.started:.1f} s sampled"]
            for thread, count in self.samples.most_common():
                idle = sum(c for w, c in self.self_[thread].items() if w.split(":")[1] in IDLE)
                lines.append(
                    f"\n## thread {thread}: {count} samples, {100 * idle / count:.0f}% waiting "
                    "(or in native code under the event loop)"
                )
                lines.append("### self (innermost frame)")
                for where, c in self.self_[thread].most_common(top):
                    lines.append(f"{100 * c / count:6.1f}%  {where}")
                lines.append("### total (on the stack)")
                for fn, c in self.total[thread].most_common(top):
                    lines.append(f"{100 * c / count:6.1f}%  {fn}")
            return "\n".join(lines)
