"""Serve while training: follow a run's checkpoints (``raymoe serve --follow RUN_DIR_OR_STORAGE_URI``).

A replica serves the run's latest *committed* checkpoint (its manifest written last, atomically, see
`raymoe.platform.checkpoint`) and polls for a newer one every ``interval_s``; a newer one is loaded beside the
serving weights and swapped in by the engine's reload, under its ``reload_policy`` ("drain", the default:
running requests finish on the old weights, waiting ones start on the new; no request fails). A checkpoint
being written has no manifest yet and is never seen; one that fails to load is logged and skipped (the old
weights keep serving) until a newer one commits.

The follower pins a step directory, never the run's root: every expert-parallel shard then reads the same step
even if training commits another one meanwhile. This module imports neither Ray nor torch.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Optional

from raymoe.platform import checkpoint, storage

logger = logging.getLogger("ray.serve")


def follow_root(run: str) -> str:
    """The checkpoint folder of ``run``: a run dir's ``checkpoints/`` (where training writes them) when it has
    one, else ``run`` itself (a folder of step dirs). Local paths come back absolute; URIs unchanged."""
    loc = storage.absolute(run)
    sub = loc / "checkpoints"
    return str(sub if storage.is_dir(sub) else loc)


def latest_committed(root: str) -> Optional[str]:
    """The newest committed checkpoint under ``root`` (a step dir with its manifest), or None."""
    found = checkpoint.latest_checkpoint(root)
    return None if found is None else str(found)


class CheckpointFollower:
    """Polls ``root`` and awaits ``reload(step_dir)`` for each newer committed checkpoint (see module docstring).

    ``current``: the step dir served now (not reloaded again). ``on_step(step_dir)`` is called after every
    successful reload (metrics). ``start()`` runs the loop as a task of the running event loop; ``stop()``
    cancels it.
    """

    def __init__(self, root: str, reload: Callable[[str], Awaitable[None]], *, interval_s: float = 2.0,
                 current: Optional[str] = None):
        if not interval_s > 0:
            raise ValueError(f"follow_interval_s must be > 0; got {interval_s!r}")
        self.root, self.reload, self.interval_s = root, reload, float(interval_s)
        self.current = current
        self._failed: Optional[str] = None  # a checkpoint that failed to load: not retried
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run())

    def stop(self) -> None:
        """Cancel the loop (from any thread: a replica's shutdown may run outside its event loop)."""
        task, self._task = self._task, None
        if task is not None:
            try:
                self._loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop is closed: the task is gone with it
                pass

    async def poll_once(self) -> bool:
        """Reload if a newer committed checkpoint exists; True if the served one changed."""
        try:
            latest = await asyncio.to_thread(latest_committed, self.root)
        except Exception as exc:  # storage briefly unreachable: keep serving, try again later
            logger.warning(f"follow {self.root}: cannot list checkpoints: {exc!r}")
            return False
        if latest is None or latest in (self.current, self._failed):
            return False
        try:
            await self.reload(latest)
        except Exception as exc:
            logger.exception(f"follow {self.root}: reload of {latest} failed; still serving {self.current}",
                             exc_info=exc)
            self._failed = latest
            return False
        self.current = latest
        logger.info(f"follow {self.root}: now serving {latest}")
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.poll_once()
