"""One pass over a text that tells each of the scrubber's detectors where it may match.

The scrubber runs some hundred patterns (detect-secrets' token detectors, context rules,
personal-data patterns); scanning the whole text with each costs milliseconds per interaction
while most lines hold nothing. ``Prefilter`` compiles every detector's pattern (or a cheaper
expression that every match contains, such as a rule's keywords) into one Hyperscan database
in prefilter mode, whose matches are a superset of the pattern's; one scan gives, per detector,
the lines where it can match, and the detector's own ``re`` pattern then runs on those lines
only. A line that no detector can match costs one pass of the automaton.

Exactness: a detector finds on its candidate lines what it finds on the whole text, provided
its matches do not span lines (the scrubber's patterns keep to one line; a span reaches one
character into the neighbouring lines for the newline some patterns start or end on). Text
that is not ASCII is scanned through an ASCII view of the same length: each other character
becomes one of its class (a digit ``0``, a letter ``a`` or its ASCII lower case, a space, or
``~``), so ``\\d``, ``\\w``, ``\\s`` and case folding still hold. Without the ``hyperscan``
package, or for an expression it cannot compile, a detector runs on the whole text.
"""

from __future__ import annotations

import re
import threading
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

__all__ = ["Candidates", "Prefilter", "ascii_view"]

Span = tuple[int, int]

_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_NEWLINE = re.compile("\n")


def _representative(m: re.Match[str]) -> str:
    ch = m.group(0)
    if ch.isdecimal():
        return "0"
    lower = ch.lower()
    if len(lower) == 1 and lower.isascii():
        return lower  # KELVIN SIGN matches k under re.IGNORECASE
    if ch.isalnum():
        return "a"
    return " " if ch.isspace() else "~"


def ascii_view(text: str) -> str:
    """``text`` with every non-ASCII character replaced by an ASCII one of its class."""
    return text if text.isascii() else _NON_ASCII.sub(_representative, text)


class Prefilter:
    """Candidate lines per detector, from one Hyperscan scan.

    ``expressions[i]`` is detector ``i``'s expression and its ``re`` flags (IGNORECASE and
    MULTILINE are honoured), or None for a detector that always runs on the whole text.
    """

    def __init__(self, expressions: Sequence[tuple[str | None, int]]) -> None:
        self.size = len(expressions)
        self.always = {i for i, (expr, _) in enumerate(expressions) if expr is None or not expr.isascii()}
        self._db: Any = None
        self._local = threading.local()
        try:
            import hyperscan
        except ImportError:  # pragma: no cover - the dependency is declared; run unfiltered without it
            self.always = set(range(self.size))
            return
        wanted: list[tuple[int, bytes, int]] = []
        for i, (expr, re_flags) in enumerate(expressions):
            if i in self.always or expr is None:
                continue
            hs_flags = hyperscan.HS_FLAG_PREFILTER
            if re_flags & re.IGNORECASE:
                hs_flags |= hyperscan.HS_FLAG_CASELESS
            if re_flags & re.MULTILINE:
                hs_flags |= hyperscan.HS_FLAG_MULTILINE
            wanted.append((i, expr.encode("ascii"), hs_flags))
        # One compilation of them all (most of a scrubber's start-up); only when Hyperscan refuses
        # the set is each expression tried alone, to find those that run on the whole text instead.
        db = _database(hyperscan, wanted)
        if db is None:
            refused = {i for i, expr, hs_flags in wanted if _database(hyperscan, [(i, expr, hs_flags)]) is None}
            self.always |= refused
            wanted = [w for w in wanted if w[0] not in refused]
            db = _database(hyperscan, wanted)
        if db is not None:
            self._db = db
            self._hyperscan = hyperscan

    @property
    def active(self) -> bool:
        return self._db is not None

    def scan(self, text: str) -> Candidates:
        """Where in ``text`` each detector may match."""
        if self._db is None:
            return Candidates(text, None, self.always)
        ends: dict[int, list[int]] = {}
        self._db.scan(
            ascii_view(text).encode("ascii"),
            match_event_handler=lambda i, _start, end, _flags, _ctx: ends.setdefault(i, []).append(end),
            scratch=self._scratch(),
        )
        return Candidates(text, ends, self.always)

    def _scratch(self) -> Any:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:  # a scratch space serves one scan at a time: one per thread
            scratch = self._local.scratch = self._hyperscan.Scratch(self._db)
        return scratch


class Candidates:
    """The result of one scan: per detector, whether and where it may match."""

    def __init__(self, text: str, ends: dict[int, list[int]] | None, always: set[int]) -> None:
        self._text = text
        self._ends = ends  # detector -> end offsets of its prefilter matches; None: no prefilter
        self._always = always
        self._newlines: list[int] | None = None

    def hits(self) -> set[int] | None:
        """The detectors that may match anywhere (cheap: ask before ``spans``), or None when every one may
        (no prefilter)."""
        return None if self._ends is None else set(self._ends) | self._always

    def spans(self, i: int) -> list[Span]:
        """The spans of the text (whole lines, merged) where detector ``i`` may match."""
        if self._ends is None or i in self._always:
            return [(0, len(self._text))]
        if i not in self._ends:
            return []
        if self._newlines is None:
            self._newlines = [m.start() for m in _NEWLINE.finditer(self._text)]
        newlines = self._newlines
        lines = sorted({bisect_left(newlines, end - 1) for end in self._ends[i]})
        return _spans(lines, newlines, len(self._text))


def _database(hyperscan: Any, wanted: Sequence[tuple[int, bytes, int]]) -> Any:
    """A Hyperscan database of (id, expression, flags), or None when it does not compile (or is empty)."""
    if not wanted:
        return None
    db = hyperscan.Database()
    try:
        db.compile(expressions=[e for _, e, _ in wanted], ids=[i for i, _, _ in wanted], elements=len(wanted),
                   flags=[f for _, _, f in wanted])
    except hyperscan.error:
        return None
    return db


def _spans(lines: list[int], newlines: list[int], size: int) -> list[Span]:
    """Merged spans of whole lines, each reaching one character into its neighbours."""
    out: list[Span] = []
    for line in lines:
        start = newlines[line - 1] + 1 if line > 0 else 0
        end = newlines[line] if line < len(newlines) else size
        lo, hi = max(0, start - 1), min(size, end + 1)
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out
