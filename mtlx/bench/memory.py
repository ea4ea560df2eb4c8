"""Memory figures for the benchmark: what each framework holds while it trains.

Three sources, each named in the results with what it measures:

  compiled    XLA's own accounting of a compiled step (`compiled.memory_analysis()`): arguments
              + outputs + temporaries - outputs aliased to donated arguments. Exact for the
              executable, on every backend; excludes the framework's other buffers.
  device      accelerators: the allocator's peak (jax `device.memory_stats()['peak_bytes_in_use']`
              is a process-wide high-water mark that cannot be reset, so it is read as the peak
              over everything run so far; torch's `max_memory_allocated` is reset per cell).
  rss         CPUs: the process's resident set, sampled by a thread every `interval` seconds
              while a framework runs its steps; reported as the peak minus the RSS just before
              that framework's model was built (after freeing what came before, and asking
              glibc to return free pages with malloc_trim), so each framework is charged for
              its weights, optimizer state, activations and workspace, approximately.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import threading
from typing import Any, Optional

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The current resident set size of this process (Linux /proc; else the max RSS so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return max_rss_bytes()


def max_rss_bytes() -> int:
    """The process's peak RSS since it started (getrusage; kilobytes on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def release_free_memory() -> None:
    """Collects garbage and asks glibc to hand free heap pages back to the OS (if available),
    so that an RSS baseline taken next is not inflated by freed buffers."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Context manager: the peak RSS while the block runs, sampled in a background thread.

        with PeakRSS() as m:
            run_steps()
        m.peak  # bytes
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return False


def compiled_bytes(compiled: Any) -> Optional[dict]:
    """{'arguments', 'outputs', 'temporaries', 'aliased', 'total'} bytes of a compiled jax
    executable (total = arguments + outputs + temporaries - aliased), or None if the backend
    gives no analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - backends without the analysis raise various errors
        return None
    if m is None:
        return None
    out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
           "temporaries": int(m.temp_size_in_bytes), "aliased": int(m.alias_size_in_bytes)}
    out["total"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out


def jax_device_peak(device: Any) -> Optional[int]:
    """The allocator's process-wide peak bytes on a jax device, or None (CPU has no stats)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", 0)) or None
