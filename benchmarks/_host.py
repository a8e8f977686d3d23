"""Host settings shared by the CPU benchmarks.

Each benchmark that allocates large tensors calls :func:`reexec_with_tuned_malloc` before it imports torch:
it runs under the same glibc malloc settings as raymoe's CLI, expert shards and serving engines
(``raymoe.platform.host_memory``), so its times are those of the processes it stands for, and fresh large
tensors do not page-fault on every allocation.
"""

from __future__ import annotations

import os
import sys

from raymoe.platform.host_memory import USER_VARS, malloc_env


def reexec_with_tuned_malloc() -> None:
    """Re-execute this script with raymoe's ``MALLOC_*`` settings in its environment, once.

    glibc reads them at process start only; through the environment they also reach the processes the
    benchmark spawns (e.g. its gloo ranks). Returns without doing anything when ``--no-reexec`` is on the
    command line or the user set any ``MALLOC_*`` / ``GLIBC_TUNABLES`` variable (their settings win; the
    re-executed process has them too, so it does not loop).
    """
    if "--no-reexec" in sys.argv or any(v in os.environ for v in USER_VARS):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **malloc_env()})
