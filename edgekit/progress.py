"""Step lines with timings, and progress bars for long loops (stderr; bars only on a terminal)."""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def step(prefix: str, what: str) -> Iterator[dict]:
    """``with step("ort-cpu", "export fp32"):`` prints the step, then its outcome and wall time."""
    info: dict = {}
    say(f"[{prefix}] {what} ...")
    t0 = time.perf_counter()
    try:
        yield info
    except BaseException:
        say(f"[{prefix}] {what} failed after {time.perf_counter() - t0:.1f} s")
        raise
    info["seconds"] = round(time.perf_counter() - t0, 2)
    extra = f" ({info['note']})" if info.get("note") else ""
    say(f"[{prefix}] {what} done in {info['seconds']:.1f} s{extra}")


PREFIX_ENV = "EDGEKIT_PROGRESS"
"""Set by the parent for a worker process (``edgekit.orchestrate.worker.run_in_worker``): the step the
worker's progress lines belong to, e.g. ``[ort-cpu] verify optimized``."""


def bar(it: Iterable[T], total: Optional[int], desc: str) -> Iterable[T]:
    """A tqdm bar on a terminal. In a worker process (its stderr is a pipe) a line at every quarter,
    ``[ort-cpu] verify optimized: 500/1000``, which the parent shows; elsewhere plain iteration (CI logs
    stay readable)."""
    prefix = os.environ.get(PREFIX_ENV)
    if prefix and total and not sys.stderr.isatty():
        return _quarters(it, total, prefix)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        return it
    return tqdm(it, total=total, desc=desc, file=sys.stderr, leave=False, disable=None, dynamic_ncols=True)


def _quarters(it: Iterable[T], total: int, prefix: str) -> Iterator[T]:
    marks = {max(1, round(total * q / 4)) for q in (1, 2, 3, 4)}
    for i, x in enumerate(it, 1):
        yield x
        if i in marks:
            say(f"{prefix}: {i}/{total}")


def note(msg: str) -> None:
    """A progress line from inside a worker (``[target] step: msg``); nothing outside one."""
    prefix = os.environ.get(PREFIX_ENV)
    if prefix:
        say(f"{prefix}: {msg}")
