"""glibc's allocator, set for tensor workloads: big freed buffers are reused, not handed back.

PyTorch's CPU tensors come straight from ``malloc``. glibc serves a request below its *mmap
threshold* from its heap and returns the heap's free top to the kernel once that exceeds the *trim
threshold*; both adapt at run time (the mmap threshold rises to the largest block freed, at most
32 MiB, and the trim threshold follows at twice that). A training step frees hundreds of MB in
backward and asks for them again in the next forward, so the heap is trimmed and regrown every step,
and each regrown page costs a page fault (the kernel zeroes it) on first touch: on a 2-core AMD EPYC
VM, DeepLabV3+-mobilenet_v2 (4x3x256x256) faulted in 250-350 MB per training step, and the step took
475-540 ms; with the thresholds below it faulted in none and took 390-405 ms (docs/performance.md).

Models call :func:`tune_cpu_allocator` once when they are built. It fixes the mmap threshold at the
value glibc's own adaptation tends to (32 MiB) and raises the trim threshold to 256 MiB, through
``mallopt``. This is a setting of the whole process, so it steps aside where the process already
chose: ``SMP_TUNE_MALLOC=0`` in the environment, glibc's threshold variables
(``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_``) or
a ``glibc.malloc`` tunable, or a C library that is not glibc (musl, macOS, Windows). A process whose
malloc is replaced (jemalloc or tcmalloc through ``LD_PRELOAD``) is unaffected: only glibc's own
malloc reads these settings. glibc cannot go back to adaptive thresholds once they are set.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Mapping, Optional

#: glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Requests below this come from the heap (glibc's adaptive threshold stops at the same 32 MiB).
MMAP_THRESHOLD = 32 << 20
#: The heap's free top is handed back to the kernel only above this.
TRIM_THRESHOLD = 256 << 20

#: Environment variable that switches the tuning off (``0``, ``false``, ``no`` or ``off``).
ENV_SWITCH = "SMP_TUNE_MALLOC"
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_lock = threading.Lock()
_applied: Optional[bool] = None  # None: not tried yet in this process


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the tuning may run under ``environ`` (the user's own settings always win)."""
    if environ.get(ENV_SWITCH, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(name in environ for name in _USER_SETTINGS):
        return False
    return "glibc.malloc" not in environ.get("GLIBC_TUNABLES", "")


def _glibc_mallopt():
    """glibc's ``mallopt`` function, or None on any other C library."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):  # musl's mallopt sets nothing
            return None
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def tune_cpu_allocator() -> bool:
    """Set glibc's thresholds once per process (see the module docstring); True if they are set.

    Later calls return the first call's answer without doing anything.
    """
    global _applied
    if _applied is not None:
        return _applied
    with _lock:
        if _applied is None:
            mallopt = _glibc_mallopt() if wanted(os.environ) else None
            # The mmap threshold first: setting either one ends glibc's adaptation of both.
            _applied = bool(
                mallopt is not None
                and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            )
    return _applied
