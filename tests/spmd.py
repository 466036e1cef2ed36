"""A group of spawned gloo processes that runs test functions on every rank.

Spawning costs seconds per process, so a test class starts one :class:`Group` and reuses it:
``group.run(fn, *args)`` pickles a module-level ``fn``, runs it on every rank, and returns each
rank's result (send numpy arrays or Python values back). A rank that raises makes ``run``
raise with that rank's traceback; a task that does not finish within ``timeout`` seconds is
an error too, and the group is torn down, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import os
import queue
import tempfile
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = 60  # seconds a gloo collective may wait before it raises


def _worker(rank: int, world: int, store: str, tasks: Any, results: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # N processes on 2 cores: more threads each is far slower
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT),
    )  # fmt: skip
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.barrier()
    dist.destroy_process_group()
    results.close()
    results.join_thread()
    # Skip interpreter teardown: a spawned child with a finished gloo group sometimes aborts
    # in C++ teardown after the work is done (see test_optim_dtensor.py).
    os._exit(0)


class Group:
    """``world`` spawned processes in one gloo group (file store: no port to race for)."""

    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        self._dir = tempfile.TemporaryDirectory()
        self._tasks = [ctx.Queue() for _ in range(world)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(
                    r,
                    world,
                    os.path.join(self._dir.name, "store"),
                    self._tasks[r],
                    self._results,
                ),
                daemon=True,
            )
            for r in range(world)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn: Any, *args: Any, timeout: float = 240) -> list[Any]:
        """``fn(*args)`` on every rank; the results in rank order."""
        for q in self._tasks:
            q.put((fn, args))
        out: dict[int, Any] = {}
        while len(out) < self.world:
            try:
                rank, ok, value = self._results.get(timeout=timeout)
            except queue.Empty:
                self.close(kill=True)
                raise TimeoutError(
                    f"{fn.__name__}: ranks {sorted(set(range(self.world)) - set(out))} did not "
                    f"finish within {timeout} s"
                ) from None
            if not ok:
                self.close(kill=True)
                raise RuntimeError(f"{fn.__name__} failed on rank {rank}:\n{value}")
            out[rank] = value
        return [out[r] for r in range(self.world)]

    def close(self, kill: bool = False) -> None:
        if kill:
            for p in self._procs:
                p.kill()
        else:
            for q in self._tasks:
                q.put(None)
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        self._dir.cleanup()
