"""Bisect router releases: which release introduced or fixed a finding.

The router was published as ``sglang-router`` and later as ``smg``; both names form one
release history, ordered by package (in ``PACKAGE_ORDER``) and then by version. Given a
release with a finding and one without, the bisect tests the midpoint release each step and
narrows the range to the adjacent pair where the result flips.

The search logic takes an ``evaluate`` callable, so it is tested without installing any
router; ``harness.matrix`` supplies the evaluator that really runs the cases.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable

from packaging.version import InvalidVersion, Version

# The router's package names, oldest first.
PACKAGE_ORDER = ("sglang-router", "smg")

FINDING = "finding"
CLEAN = "clean"
# The release could not be installed or started, or its result is not about the finding
# (crash, HTTP 5xx): the bisect steps around it.
SKIP = "skip"


class BisectError(RuntimeError):
    """The bisect cannot start or cannot conclude; the message explains why in one line."""


@dataclass(frozen=True)
class Outcome:
    """Result of running the cases on one release."""

    release: str
    status: str
    kinds: frozenset[str] = frozenset()
    detail: str = ""


@dataclass
class BisectResult:
    # The adjacent pair (in release order) where the result flips.
    last_before: Outcome | None
    first_after: Outcome | None
    flipped_kinds: frozenset[str]
    tried: list[Outcome] = field(default_factory=list)
    # Releases between the flip pair that could not be tested, so the flip lies among them.
    untested_between: list[str] = field(default_factory=list)
    # Tested releases whose result disagrees with the side of the flip they are on.
    non_monotonic: list[Outcome] = field(default_factory=list)

    def summary(self) -> str:
        if self.last_before is None or self.first_after is None:
            return "no flip found"
        kinds = ", ".join(sorted(self.flipped_kinds))
        text = (
            f"{kinds}: {self.last_before.status} in {self.last_before.release}, "
            f"{self.first_after.status} in {self.first_after.release} "
            f"({len(self.tried)} releases tried)"
        )
        if self.untested_between:
            text += f"; untested in between: {', '.join(self.untested_between)}"
        if self.non_monotonic:
            odd = ", ".join(f"{o.release} ({o.status})" for o in self.non_monotonic)
            text += f"; results are not monotonic, the flip is not unique: {odd}"
        return text


def parse_spec(spec: str) -> tuple[str, Version]:
    """Split ``name==version`` into a package name and a version; raise BisectError otherwise."""
    name, separator, version = spec.partition("==")
    if not separator or name not in PACKAGE_ORDER:
        raise BisectError(f"release {spec!r} is not of the form sglang-router==X or smg==X")
    try:
        return name, Version(version)
    except InvalidVersion:
        raise BisectError(f"release {spec!r} has an invalid version {version!r}") from None


def order_key(spec: str) -> tuple[int, Version]:
    name, version = parse_spec(spec)
    return PACKAGE_ORDER.index(name), version


def registry_versions(package: str) -> list[str]:
    """Return every version of a package on the configured index, via ``pip index versions``."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", package],
        capture_output=True,
        text=True,
        timeout=120,
    )
    for line in result.stdout.splitlines():
        if line.startswith("Available versions:"):
            return [v.strip() for v in line.split(":", 1)[1].split(",") if v.strip()]
    raise BisectError(f"could not list the versions of {package} on the package index: {result.stderr.strip()[:200]}")


def releases_between(good: str, bad: str, candidates: Iterable[str] | None = None) -> list[str]:
    """Return the releases from ``good`` to ``bad`` inclusive, in that direction.

    Without ``candidates`` the list comes from the package index, for both package names.
    """
    if candidates is None:
        candidates = [f"{package}=={version}" for package in PACKAGE_ORDER for version in registry_versions(package)]
    pool = set(candidates) | {good, bad}
    ordered = sorted(pool, key=order_key)
    low, high = sorted((ordered.index(good), ordered.index(bad)))
    span = ordered[low : high + 1]
    return span if ordered.index(good) <= ordered.index(bad) else list(reversed(span))


def bisect(releases: list[str], evaluate: Callable[[str], Outcome], verify: int = 0) -> BisectResult:
    """Find the adjacent pair of ``releases`` where the result of ``releases[0]`` flips.

    ``releases[0]`` and ``releases[-1]`` must both be testable and must disagree on at
    least one finding kind; the kinds in which they disagree are what the bisect follows.
    A binary search alone cannot see a history that flips more than once, because every
    release it tests ends up on the side of its own result. ``verify`` more releases, spread
    over the untested ones, are tested afterwards; any of them on the wrong side of the
    flip is reported in ``non_monotonic``.
    """
    if len(releases) < 2:
        raise BisectError("bisect needs two different releases")
    tried: dict[str, Outcome] = {}

    def run(index: int) -> Outcome:
        spec = releases[index]
        if spec not in tried:
            tried[spec] = evaluate(spec)
        return tried[spec]

    first, last = run(0), run(len(releases) - 1)
    for end in (first, last):
        if end.status == SKIP:
            raise BisectError(f"release {end.release} could not be tested: {end.detail}")
    flipped = first.kinds ^ last.kinds
    if not flipped:
        raise BisectError(
            f"{first.release} and {last.release} show the same finding kinds "
            f"({', '.join(sorted(first.kinds)) or 'none'}); nothing to bisect"
        )

    def side(outcome: Outcome) -> bool:
        """True when the outcome agrees with the first release on the flipped kinds."""
        return (outcome.kinds & flipped) == (first.kinds & flipped)

    low, high = 0, len(releases) - 1
    skipped: set[int] = set()
    while high - low > 1:
        middle = _next_probe(low, high, skipped)
        if middle is None:
            break
        outcome = run(middle)
        if outcome.status == SKIP:
            skipped.add(middle)
            continue
        if side(outcome):
            low = middle
        else:
            high = middle

    untested = [i for i in range(len(releases)) if releases[i] not in tried and not low < i < high]
    if verify > 0 and untested:
        step = max(1, len(untested) // verify)
        for index in untested[step // 2 :: step][:verify]:
            run(index)

    order = {spec: index for index, spec in enumerate(releases)}
    tested = [o for o in tried.values() if o.status != SKIP]
    non_monotonic = [
        o for o in tested if (order[o.release] <= low and not side(o)) or (order[o.release] >= high and side(o))
    ]
    return BisectResult(
        last_before=run(low),
        first_after=run(high),
        flipped_kinds=frozenset(flipped),
        tried=sorted(tried.values(), key=lambda o: order[o.release]),
        untested_between=[releases[i] for i in range(low + 1, high)],
        non_monotonic=non_monotonic,
    )


def _next_probe(low: int, high: int, skipped: set[int]) -> int | None:
    """Return the untested index nearest the middle of (low, high), or None when all are skipped."""
    middle = (low + high) // 2
    for distance in range(0, high - low):
        for index in (middle - distance, middle + distance):
            if low < index < high and index not in skipped:
                return index
    return None
