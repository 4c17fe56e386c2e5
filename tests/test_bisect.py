"""The bisect logic, on made-up release histories (no router is installed here)."""

from __future__ import annotations

import pytest

from harness.bisect import CLEAN, FINDING, SKIP, BisectError, Outcome, bisect, order_key, releases_between

HISTORY = [f"sglang-router==0.3.{i}" for i in range(3)] + [f"smg==1.{i}.0" for i in range(8)]


def evaluator(answers: dict[str, str], calls: list[str] | None = None):
    """Build an evaluate callable: 'finding' carries the kind missing-bos, 'skip' cannot run."""

    def evaluate(spec: str) -> Outcome:
        if calls is not None:
            calls.append(spec)
        status = answers[spec]
        kinds = frozenset({"missing-bos"}) if status == FINDING else frozenset()
        return Outcome(release=spec, status=status, kinds=kinds, detail="install failed" if status == SKIP else "")

    return evaluate


def history_flipping_at(index: int) -> dict[str, str]:
    return {spec: (FINDING if i < index else CLEAN) for i, spec in enumerate(HISTORY)}


def test_order_puts_sglang_router_before_smg():
    shuffled = ["smg==1.10.0", "sglang-router==0.3.2", "smg==1.2.0", "sglang-router==0.2.4"]
    assert sorted(shuffled, key=order_key) == ["sglang-router==0.2.4", "sglang-router==0.3.2", "smg==1.2.0", "smg==1.10.0"]


def test_releases_between_follows_direction():
    span = releases_between("smg==1.4.0", "sglang-router==0.3.1", candidates=HISTORY)
    assert span[0] == "smg==1.4.0"
    assert span[-1] == "sglang-router==0.3.1"
    assert len(span) == 7


@pytest.mark.parametrize("flip", range(1, len(HISTORY)))
def test_bisect_finds_every_flip_point(flip):
    calls: list[str] = []
    result = bisect(HISTORY, evaluator(history_flipping_at(flip), calls))
    assert result.last_before.release == HISTORY[flip - 1]
    assert result.first_after.release == HISTORY[flip]
    assert result.flipped_kinds == {"missing-bos"}
    assert len(set(calls)) <= 6  # log2(11) + 2 ends
    assert result.non_monotonic == []


def test_bisect_steps_around_skipped_releases():
    answers = history_flipping_at(6)
    answers[HISTORY[5]] = SKIP
    answers[HISTORY[4]] = SKIP
    result = bisect(HISTORY, evaluator(answers))
    assert result.last_before.release == HISTORY[3]
    assert result.first_after.release == HISTORY[6]
    assert result.untested_between == [HISTORY[4], HISTORY[5]]
    assert "untested in between" in result.summary()


def test_bisect_reports_non_monotonic_answers():
    # The finding disappears at 3, comes back at 5 and disappears again at 8.
    answers = {spec: CLEAN for spec in HISTORY}
    for i in (0, 1, 2, 5, 6, 7):
        answers[HISTORY[i]] = FINDING
    calls: list[str] = []
    result = bisect(HISTORY, evaluator(answers, calls), verify=3)
    flip = (HISTORY.index(result.last_before.release), HISTORY.index(result.first_after.release))
    assert flip[1] == flip[0] + 1
    assert answers[result.last_before.release] == FINDING
    assert answers[result.first_after.release] == CLEAN
    # Whichever flip it lands on, a release tested on the wrong side of it must be named.
    tested_wrong_side = [
        spec
        for spec in set(calls)
        if (HISTORY.index(spec) < flip[0] and answers[spec] == CLEAN)
        or (HISTORY.index(spec) > flip[1] and answers[spec] == FINDING)
    ]
    assert tested_wrong_side, "verification should have tested a release on the wrong side"
    assert {o.release for o in result.non_monotonic} == set(tested_wrong_side)
    assert "not monotonic" in result.summary()


def test_bisect_verification_finds_nothing_on_a_monotonic_history():
    result = bisect(HISTORY, evaluator(history_flipping_at(6)), verify=3)
    assert len(result.tried) > 5
    assert result.non_monotonic == []


def test_bisect_rejects_ends_that_agree():
    answers = {spec: FINDING for spec in HISTORY}
    with pytest.raises(BisectError, match="same finding kinds"):
        bisect(HISTORY, evaluator(answers))


def test_bisect_rejects_an_untestable_end():
    answers = history_flipping_at(4)
    answers[HISTORY[0]] = SKIP
    with pytest.raises(BisectError, match="could not be tested"):
        bisect(HISTORY, evaluator(answers))


def test_bad_spec_is_one_line_error():
    with pytest.raises(BisectError, match="not of the form"):
        releases_between("vllm==1.0", "smg==1.0.0", candidates=HISTORY)
