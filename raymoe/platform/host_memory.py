"""glibc malloc settings for the processes that run models on CPU.

By default glibc serves large allocations from fresh ``mmap`` pages and unmaps them on free (the threshold
starts at 128 KiB and adapts up to 32 MiB), and it returns free memory at the top of the heap to the OS.
PyTorch on CPU allocates new activation and gradient tensors every step, so with those defaults every step
page-faults on each page it writes. Serving large allocations from the heap and keeping freed memory there
lets the next step reuse pages it already touched (``benchmarks/host_memory.py`` measures the difference).

glibc reads the ``MALLOC_*`` environment variables only at process start, and Ray workers, Serve replicas and
the CLI start without them, so :func:`tune_malloc` makes the same settings at run time with ``mallopt``; they
apply to every later allocation of the process. :func:`malloc_env` gives them as environment variables for a
process that is about to start (the benchmarks re-execute themselves with it, so the settings also hold in the
processes they spawn). The cost is resident memory: up to ``TRIM_THRESHOLD`` of freed memory stays mapped for
reuse instead of going back to the OS.

Opt out with ``RAYMOE_TUNE_MALLOC=0``. Settings made through the ``MALLOC_*`` variables or ``GLIBC_TUNABLES``
are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV_SWITCH = "RAYMOE_TUNE_MALLOC"
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h>
MMAP_THRESHOLD = 1 << 30  # allocations below 1 GiB come from the heap (recycled pages)
MMAP_THRESHOLD_FALLBACK = 32 << 20  # the largest value older glibc accepts (half its heap size)
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of free memory at the top of the heap
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps: fewer brk calls while the first steps allocate
USER_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
             "GLIBC_TUNABLES")  # a user who sets any of these has chosen their own settings

_applied: bool | None = None


def tune_malloc() -> bool:
    """Apply the settings once per process; True if they are in force (now or from an earlier call).

    False, doing nothing, where it does not apply: ``RAYMOE_TUNE_MALLOC=0``, the user set ``MALLOC_*`` or
    ``GLIBC_TUNABLES`` themselves, not Linux, or a C library without glibc's ``mallopt`` (e.g. musl).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux") or any(v in os.environ for v in USER_VARS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already uses
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) or mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_FALLBACK))
    ok = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and ok
    ok = bool(mallopt(_M_TOP_PAD, TOP_PAD)) and ok
    _applied = ok
    return ok


def malloc_env() -> dict[str, str]:
    """The settings of :func:`tune_malloc` as glibc's ``MALLOC_*`` environment variables, for a new process."""
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
            "MALLOC_TOP_PAD_": str(TOP_PAD)}
