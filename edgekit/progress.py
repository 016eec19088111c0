"""Step lines with timings, and progress bars for long loops (stderr; bars only on a terminal)."""
from __future__ import annotations

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


def bar(it: Iterable[T], total: Optional[int], desc: str) -> Iterable[T]:
    """A tqdm bar on a terminal; plain iteration elsewhere (CI logs stay readable)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        return it
    return tqdm(it, total=total, desc=desc, file=sys.stderr, leave=False, disable=None, dynamic_ncols=True)
