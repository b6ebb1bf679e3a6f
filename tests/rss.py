"""Peak resident memory of a call, for the memory tests' child processes (`from tests.rss import peak_rss`).

`ru_maxrss` is a lifetime maximum that imports can already exceed, so a thread samples VmRSS every millisecond while
the call runs (the tensors these tests watch are tens of MB and live for many milliseconds)."""

import threading
import time


def rss() -> int:
    """Current resident set size in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def peak_rss(fn):
    """(`fn()`'s result, RSS before the call, peak RSS during it)."""
    base, peak, running = rss(), [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = fn()
    finally:
        running[0] = False
        sampler.join()
    return result, base, max(peak[0], rss())
