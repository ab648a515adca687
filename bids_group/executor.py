"""Where the heavy, independent work runs: in this process, or as tasks on a Dask cluster.

The permutation engine cuts its relabellings into chunks that the seed alone defines
(:func:`bids_group.inference.permutation.chunk_ranges`); an executor runs one function per chunk
and gives the results back **in chunk order**, so the pooled null distributions are the same bits
whatever runs them. :class:`DaskExecutor` submits the chunks to the workers of a running Dask
scheduler (``--dask-scheduler ADDRESS`` or ``--scheduler-file FILE``, as written by ``dask
scheduler --scheduler-file``, dask-jobqueue or dask-mpi). The shared state (the data and the
design) is one task whose result every chunk uses (so that it can be recomputed). A task whose
worker dies is rerun by the scheduler on another worker; as every task is a pure function of its
arguments, the results do not change.

Dask is optional (``pip install 'bids-group[dask]'``) and imported only when a scheduler is given:
the default path never pays its import cost.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from bids_group.errors import ServiceError, UsageError

log = logging.getLogger(__name__)

#: Seconds to wait for the scheduler, and for at least one worker.
CONNECT_TIMEOUT = 30


class Executor(Protocol):
    """Runs ``fn(shared, *args)`` for each ``args`` of ``items`` and yields the results in order."""

    def map_chunks(
        self, fn: Callable[..., Any], shared: Any, items: Sequence[tuple]
    ) -> Iterator[Any]: ...


class InProcessExecutor:
    """Every chunk in this process, one after the other (tests; the reference of the others)."""

    def map_chunks(self, fn, shared, items) -> Iterator[Any]:
        for args in items:
            yield fn(shared, *args)


class DaskExecutor:
    """Chunks as tasks of a ``distributed.Client``; results gathered in chunk order."""

    def __init__(self, client: Any):
        self.client = client

    @property
    def n_workers(self) -> int:
        """Workers connected now (sizes the chunks; never changes a result)."""
        return len(self.client.scheduler_info().get("workers", {}))

    def map_chunks(self, fn, shared, items) -> Iterator[Any]:
        # A task, not scattered data: the scheduler can recompute it when a worker holding it
        # dies (scattered data would be lost for good).
        with warnings.catch_warnings():  # the data travel once, in this task, on purpose
            warnings.filterwarnings("ignore", message="Sending large graph")
            shared_future = self.client.submit(_value, shared, pure=False)
        futures = [self.client.submit(fn, shared_future, *args, pure=False) for args in items]
        try:
            for future in futures:
                yield future.result()
        finally:
            self.client.cancel([*futures, shared_future])

    def close(self) -> None:
        """Disconnect this client (the scheduler and its workers keep running)."""
        self.client.close()

    def describe(self) -> str:
        workers = self.client.scheduler_info().get("workers", {})
        threads = sum(w.get("nthreads", 0) for w in workers.values())
        address = self.client.scheduler.address
        return f"Dask scheduler {address}: {len(workers)} workers, {threads} threads"


def _value(shared: Any) -> Any:
    return shared


def task_threads() -> int:
    """Threads a task may use: the cores this process may run on, shared among the threads of
    the Dask worker running it (1 outside a worker). A worker started with ``--nthreads 1`` on
    8 cores (the recipe below the README's Dask section) decodes 8 maps at a time."""
    try:
        from distributed import get_worker

        worker_threads = get_worker().state.nthreads
    except (ImportError, ValueError):  # not in a Dask worker
        return 1
    return max(1, len(os.sched_getaffinity(0)) // max(1, worker_threads))


def _check_scheduler_file(path: Path) -> None:
    """Wait until the file exists and names a scheduler address, as ``dask scheduler
    --scheduler-file`` writes it, for at most :data:`SCHEDULER_FILE_WAIT` seconds.

    Waiting lets a batch script start the scheduler in the background and bids-group at once
    (README's SLURM recipe): the scheduler writes its file a second or two after it starts.
    Anything still not a scheduler file then is refused in one line: Dask's own reader retries
    ten times on it, then fails on an assertion and leaves a client whose clean-up hangs 60 s.
    """
    deadline = time.monotonic() + SCHEDULER_FILE_WAIT
    said = False
    while True:
        content: Any = None
        if path.is_file():
            try:
                content = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as err:
                content = err
            if isinstance(content, dict) and isinstance(content.get("address"), str):
                return
        if time.monotonic() >= deadline:
            break
        if not said:
            log.info("waiting up to %.0f s for the scheduler to write %s", SCHEDULER_FILE_WAIT,
                     path)  # fmt: skip
            said = True
        time.sleep(0.2)
    if not path.is_file():
        raise ServiceError(
            f"--scheduler-file {path}: no such file after {SCHEDULER_FILE_WAIT:.0f} s (start "
            "the scheduler with `dask scheduler --scheduler-file FILE` first)"
        )
    raise ServiceError(
        f"--scheduler-file {path}: no scheduler address in it (a JSON object with 'address', "
        "as `dask scheduler --scheduler-file FILE` writes): is it the right file?"
    )


#: Seconds to wait for the scheduler file to be written (see :func:`_check_scheduler_file`).
SCHEDULER_FILE_WAIT = float(CONNECT_TIMEOUT)


def connect(address: str | None = None, scheduler_file: Path | None = None) -> DaskExecutor:
    """A :class:`DaskExecutor` on a running scheduler (at ``address``, or the one a
    ``--scheduler-file`` names), with at least one worker.

    Raises
    ------
    UsageError
        Both or neither given, or Dask not installed.
    ServiceError (69)
        The scheduler cannot be reached, or it has no worker within :data:`CONNECT_TIMEOUT`.
    """
    if (address is None) == (scheduler_file is None):
        raise UsageError("give one of --dask-scheduler ADDRESS and --scheduler-file FILE")
    try:
        from distributed import Client
    except ImportError as err:
        raise UsageError(
            "--dask-scheduler / --scheduler-file need Dask: pip install 'bids-group[dask]'"
        ) from err
    where = f"the Dask scheduler at {address}" if address else f"the scheduler of {scheduler_file}"
    if scheduler_file is not None:
        _check_scheduler_file(Path(scheduler_file))
    try:
        client = Client(
            address=address,
            scheduler_file=None if scheduler_file is None else str(scheduler_file),
            timeout=CONNECT_TIMEOUT,
            set_as_default=False,
        )
    except (OSError, TimeoutError, ValueError) as err:
        raise ServiceError(f"could not connect to {where}: {err}") from err
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as err:
        client.close()
        raise ServiceError(f"{where} has no worker after {CONNECT_TIMEOUT} s: start workers "
                           "(`dask worker --scheduler-file FILE`)") from err  # fmt: skip
    executor = DaskExecutor(client)
    log.info("%s", executor.describe())
    return executor
