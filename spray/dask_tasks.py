"""Dask task submission shared by the stages that run on a cluster (attribution, analysis)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any


def bounded_map(client: Any, function: Callable[..., Any], jobs: Iterable[tuple[int, tuple]]) -> Iterator[tuple[int, Any]]:
    """Submit ``function(*args)`` for each ``(key, args)`` of ``jobs``, at most two per
    worker thread at a time, so that only that many tasks' inputs are in memory at once
    (``jobs`` is consumed lazily).

    Yields ``(key, result)`` in completion order; a task's error is raised here.
    """
    from distributed import as_completed

    limit = 2 * max(1, sum(client.nthreads().values()))
    pending = as_completed()
    chunk_of: dict[str, int] = {}
    source = iter(jobs)

    def submit_next() -> bool:
        try:
            chunk, args = next(source)
        except StopIteration:
            return False
        future = client.submit(function, *args, pure=False)
        chunk_of[future.key] = chunk
        pending.add(future)
        return True

    for _ in range(limit):
        if not submit_next():
            break
    for future in pending:
        yield chunk_of.pop(future.key), future.result()
        submit_next()


#: Calls ``function(*args)`` for each ``args`` of a list and returns the results in order.
StarMap = Callable[[Callable[..., Any], Sequence[tuple]], list[Any]]


def starmap_here(function: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
    """The default :data:`StarMap`: every call in this process, one after another."""
    return [function(*args) for args in calls]


def ordered_map(client: Any, function: Callable[..., Any], calls: Iterable[tuple]) -> list[Any]:
    """``function(*args)`` for each ``args`` of ``calls`` as tasks on ``client``'s workers
    (:func:`bounded_map`: ``calls`` is consumed lazily), the results in the calls' order."""
    results = dict(bounded_map(client, function, enumerate(calls)))
    return [results[index] for index in range(len(results))]


def dask_starmap(client: Any) -> StarMap:
    """A :data:`StarMap` whose calls are tasks on ``client``'s workers (``function`` must be
    importable there, e.g. a module-level function of spray)."""
    return lambda function, calls: ordered_map(client, function, calls)
