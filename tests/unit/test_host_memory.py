"""raymoe.platform.host_memory.tune_malloc: glibc settings that let a process reuse freed tensor memory."""

import json
import os
import subprocess
import sys

import pytest


def _has_glibc_mallinfo2() -> bool:
    import ctypes

    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _has_glibc_mallinfo2(), reason="needs glibc >= 2.33 (mallopt, mallinfo2)")

_PROBE = r"""
import ctypes, json
import torch
from raymoe.platform.host_memory import tune_malloc

first = tune_malloc()
again = tune_malloc()


class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]


mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
x = torch.ones(10240, 1024)  # 40 MiB: above glibc's default mmap threshold
mapped = mallinfo2().hblkhd
del x
print(json.dumps({"first": first, "again": again, "mmapped_mib": mapped / 2**20,
                  "free_in_heap_mib": mallinfo2().fordblks / 2**20}))
"""


def _probe(**env_overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.pop("RAYMOE_TUNE_MALLOC", None)
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_process_keeps_freed_tensor_memory_for_reuse():
    tuned = _probe()
    assert tuned["first"] is True and tuned["again"] is True
    # the tensor came from the heap and its memory stays there for the next one (no fresh pages to fault in)
    assert tuned["mmapped_mib"] < 40 <= tuned["free_in_heap_mib"], tuned
    default = _probe(RAYMOE_TUNE_MALLOC="0")
    assert default["first"] is False and default["again"] is False
    # glibc's default: mapped on its own, unmapped on free
    assert default["mmapped_mib"] >= 40 > default["free_in_heap_mib"], default


@pytest.mark.parametrize("env", [{"RAYMOE_TUNE_MALLOC": "off"}, {"MALLOC_TRIM_THRESHOLD_": "1000000"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}])
def test_opt_out_and_the_users_own_settings_are_respected(env):
    assert _probe(**env)["first"] is False


def test_malloc_env_gives_a_new_process_the_same_settings():
    # what the benchmarks re-execute themselves with (benchmarks/_host.py): tune_malloc stands aside (the
    # user's MALLOC_* win) and the environment alone keeps the tensor in the heap
    from raymoe.platform import host_memory as hm

    env = hm.malloc_env()
    assert env == {"MALLOC_MMAP_THRESHOLD_": str(hm.MMAP_THRESHOLD),
                   "MALLOC_TRIM_THRESHOLD_": str(hm.TRIM_THRESHOLD), "MALLOC_TOP_PAD_": str(hm.TOP_PAD)}
    started = _probe(**env)
    assert started["first"] is False
    assert started["mmapped_mib"] < 40 <= started["free_in_heap_mib"], started
