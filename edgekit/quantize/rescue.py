"""No conversion error ends a target while a fallback can save it.

When a toolchain's int8 quantization or conversion fails and its message names what failed (a source
line, a graph node: ``Backend.units_of_error``), that unit is kept in float and the build is retried,
at most ``MAX_RESCUES`` times and within the caller's time limit. Each rescue is recorded with the
toolchain's message, cut to its first line, for the report. Only when the message names nothing new
(or the limits are spent) does the target fail, with the toolchain's message.

The first build (``edgekit.orchestrate.worker``) and every step of the accuracy search
(``edgekit.quantize.search``) quantize through ``quantize``. This module never imports a toolchain.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from edgekit.errors import TargetError
from edgekit.progress import say

MAX_RESCUES = 4
"""Retries with more units in float before the target fails with the toolchain's message."""


@dataclass
class Rescue:
    kept_float: list[str]
    """The units the toolchain's message named, kept in float for the retry."""
    because: str
    """The toolchain's message, first line."""


def _headline(message: str) -> str:
    """The line of a toolchain message that says what failed (the first with 'error', else the first)."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    return next((ln for ln in lines if "error" in ln.lower() and ":" in ln), lines[0] if lines else "")[:300]


def quantize(backend, fp32, calibration, out: Path, opts, *, tag: str, deadline: Optional[float] = None,
             log: Optional[list] = None) -> tuple[Any, Any]:
    """``backend.quantize`` that keeps what a failure names in float and retries. Returns (the artifact,
    the options it was finally built with); the artifact's ``details["conversion_rescues"]`` lists each
    rescue (also appended to ``log``: a build's later steps start from the rescued options and need no
    rescue of their own, so the build says what the shipped artifact owes to rescues: ``attach``).
    ``deadline``: a ``time.perf_counter()`` after which no retry starts. Raises the last TargetError
    when nothing can save the build."""
    rescues: list[Rescue] = []
    while True:
        try:
            art = backend.quantize(fp32, calibration, out, opts)
        except TargetError as e:
            message = str(e)
            kept = set(backend.float_units(opts))
            units = [u for u in backend.units_of_error(fp32, opts, message) if u not in kept]
            late = deadline is not None and time.perf_counter() > deadline
            if not units or len(rescues) >= MAX_RESCUES or late:
                if rescues:
                    why = ("no time left" if late else f"{MAX_RESCUES} rescues tried" if units
                           else "the message names nothing more to keep in float")
                    raise TargetError(f"{message}\n(after keeping in float "
                                      + "; ".join(", ".join(r.kept_float) for r in rescues)
                                      + f"; {why})") from None
                raise
            rescues.append(Rescue(sorted(units), _headline(message)))
            if log is not None:
                log.append(asdict(rescues[-1]))
            say(f"{tag}: {_headline(message)}: keeping {', '.join(sorted(units))} in float and retrying")
            opts = backend.keep_in_float(opts, units)
            continue
        if rescues:
            art.details["conversion_rescues"] = [asdict(r) for r in rescues]
        return art, opts


def attach(art, log: list[dict], float_units: list[str]) -> None:
    """Record on the shipped artifact every rescue of its build whose units it keeps in float."""
    kept, seen, mine = set(float_units), set(), []
    for r in log:
        if set(r["kept_float"]) <= kept and tuple(r["kept_float"]) not in seen:
            seen.add(tuple(r["kept_float"]))
            mine.append(r)
    if mine:
        art.details["conversion_rescues"] = mine
