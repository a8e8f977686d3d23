"""Serve while training: follow a run's checkpoints (``raymoe serve --follow RUN_DIR_OR_STORAGE_URI``).

A replica serves the run's latest *committed* checkpoint (its manifest written last, atomically, see
`raymoe.platform.checkpoint`) and polls for a newer one every ``interval_s``; a newer one is loaded beside the
serving weights and swapped in by the engine's reload, under its ``reload_policy`` ("drain", the default:
running requests finish on the old weights, waiting ones start on the new; no request fails). A checkpoint
being written has no manifest yet and is never seen; one that fails to load is logged and skipped (the old
weights keep serving) until a newer one commits.

The follower pins a step directory, never the run's root: every expert-parallel shard then reads the same step
even if training commits another one meanwhile.

``--live`` (`LiveFollower`): on the training run's Ray cluster, also the weights the run publishes in memory
(`raymoe.actors.weight_registry`); each poll serves the newest step of the two sources, never an older one.
This module imports Ray only there, inside the call.
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

    async def _latest(self):
        """What to serve now (a committed step dir), or None; raises when the storage cannot be listed."""
        return await asyncio.to_thread(latest_committed, self.root)

    async def poll_once(self) -> bool:
        """Reload if a newer committed checkpoint exists; True if the served one changed."""
        try:
            latest = await self._latest()
        except Exception as exc:  # storage briefly unreachable: keep serving, try again later
            logger.warning(f"follow {self.root}: cannot list checkpoints: {exc!r}")
            return False
        if latest is None or str(latest) in (self.current, self._failed):
            return False
        try:
            await self.reload(latest)
        except Exception as exc:
            logger.exception(f"follow {self.root}: reload of {latest} failed; still serving {self.current}",
                             exc_info=exc)
            self._failed = str(latest)
            return False
        self.current = str(latest)
        self._served(latest)
        logger.info(f"follow {self.root}: now serving {latest}")
        return True

    def _served(self, source) -> None:
        """Called after a successful reload of ``source``."""

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.poll_once()


def live_run_name(root: str) -> str:
    """The run whose published weights ``--live`` follows: the name of the run dir that holds ``root`` (a
    run's ``checkpoints/`` folder, see `follow_root`). ValueError for a folder that is not a run's."""
    loc = storage.absolute(root)
    if loc.name != "checkpoints" or not loc.parent.name:
        raise ValueError(f"follow_live needs a training run's folder (RUN_DIR, with checkpoints/ inside); "
                         f"{root} is not one")
    return loc.parent.name


class LiveFollower(CheckpointFollower):
    """``--live``: follows a run's checkpoints and, on the same Ray cluster, the weights its shards publish
    (`raymoe.actors.weight_registry`, ``cluster.publish_interval``): each poll serves the newest step of the
    two, and only a step newer than the one served (a version that cannot be fetched, e.g. its shard died, is
    skipped: the previous weights keep serving and a later version or checkpoint replaces them).

    The registry is the one of the run named after the run dir (`live_run_name`), used only when it reports
    this checkpoint folder (another run of the same name elsewhere is ignored). ``current_step``: the step
    served now. Runs in a Ray process (a replica).
    """

    def __init__(self, root: str, reload: Callable[[object], Awaitable[None]], *, interval_s: float = 2.0,
                 current: Optional[str] = None, current_step: Optional[int] = None, timeout_s: float = 30.0):
        super().__init__(root, reload, interval_s=interval_s, current=current)
        self.run, self.step, self.timeout_s = live_run_name(root), current_step, timeout_s
        self._steps: dict[str, int] = {}  # checkpoint dir -> its step (read once)
        self._live_error: Optional[BaseException] = None

    async def _latest(self):
        path = await asyncio.to_thread(latest_committed, self.root)
        if path is not None and path not in self._steps:
            self._steps[path] = await asyncio.to_thread(lambda: checkpoint.read_manifest(path)["step"])
        after, ckpt_step = -1 if self.step is None else self.step, self._steps.get(path, -1)
        # at a tie the version in memory wins: it loads faster than the files
        live = await asyncio.to_thread(self._live, max(after, ckpt_step - 1))
        if live is not None:
            return live
        return path if ckpt_step > after else None

    def _live(self, after: int):
        """The registry's newest version after step ``after``, or None (no registry, another run's, gone)."""
        from raymoe.actors.weight_registry import latest_version

        try:
            found, self._live_error = latest_version(self.run, self.root, after, self.timeout_s), None
            return found
        except Exception as exc:  # the run ended or its coordinator is being replaced: checkpoints remain
            if self._live_error is None:  # once, not at every poll
                logger.warning(f"follow {self.root}: no live weights of run {self.run!r} ({exc!r}); "
                               "following its checkpoints")
            self._live_error = exc
            return None

    def _served(self, source) -> None:
        self.step = getattr(source, "step", None)
        if self.step is None:
            self.step = self._steps.get(str(source))
