"""The up/down decision and the upstream choice, without sockets."""

from __future__ import annotations

import pytest

from proxy.health.state import HealthState, State, Transition, choose_upstream
from proxy.metrics import Buckets


def feed(state: HealthState, results: str) -> list[Transition]:
    """Feed ``+`` (pass) and ``-`` (fail) results; return the transitions they caused."""
    out = []
    for r in results:
        t = state.record(r == "+", "ok" if r == "+" else "connection refused")
        if t is not None:
            out.append(t)
    return out


def test_first_check_decides_at_once() -> None:
    up = HealthState(rise=2, fall=3)
    assert feed(up, "+") == [Transition(State.UNKNOWN, State.UP, "ok", 1)]
    down = HealthState(rise=2, fall=3)
    [t] = feed(down, "-")
    assert (t.old, t.new, t.reason, t.checks) == (State.UNKNOWN, State.DOWN,
                                                    "connection refused", 1)
    assert not t.is_flip


def test_goes_down_after_fall_consecutive_failures() -> None:
    h = HealthState(rise=2, fall=3)
    feed(h, "+")
    assert feed(h, "--") == []
    assert h.state is State.UP
    [t] = feed(h, "-")
    assert (t.old, t.new, t.checks) == (State.UP, State.DOWN, 3)
    assert t.is_flip
    assert str(t.old) == "UP" and str(t.new) == "DOWN"


def test_a_success_between_failures_resets_the_count() -> None:
    h = HealthState(rise=2, fall=3)
    feed(h, "+")
    assert feed(h, "--+--+--") == []
    assert h.state is State.UP


def test_comes_back_up_after_rise_consecutive_successes() -> None:
    h = HealthState(rise=2, fall=3)
    feed(h, "-")
    assert feed(h, "+-+") == []
    assert h.state is State.DOWN
    [t] = feed(h, "+")
    assert (t.old, t.new, t.reason, t.checks) == (State.DOWN, State.UP, "ok", 2)


def test_rise_and_fall_of_one_flip_on_every_disagreeing_result() -> None:
    h = HealthState(rise=1, fall=1)
    ts = feed(h, "+-+-")
    assert [t.new for t in ts] == [State.UP, State.DOWN, State.UP, State.DOWN]


def test_agreeing_results_cause_no_transition() -> None:
    h = HealthState(rise=2, fall=3)
    feed(h, "+")
    assert feed(h, "+" * 50) == []


def test_rise_or_fall_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        HealthState(rise=0, fall=3)


def test_choose_upstream_prefers_the_upstream_then_backups_in_order() -> None:
    assert choose_upstream([("a", State.UP), ("b", State.UP)]) == "a"
    assert choose_upstream([("a", State.DOWN), ("b", State.DOWN), ("c", State.UP)]) == "c"
    assert choose_upstream([("a", State.DOWN), ("b", State.UNKNOWN)]) == "b"


def test_choose_upstream_treats_unchecked_and_unknown_as_usable() -> None:
    assert choose_upstream([("a", None)]) == "a"
    assert choose_upstream([("a", State.UNKNOWN), ("b", State.UP)]) == "a"


def test_choose_upstream_is_none_when_all_are_down() -> None:
    assert choose_upstream([("a", State.DOWN), ("b", State.DOWN)]) is None
    assert choose_upstream([]) is None


def test_buckets_are_cumulative_and_end_with_inf() -> None:
    b = Buckets((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0):
        b.observe(v)
    assert b.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert b.count == 4
    assert b.sum == pytest.approx(2.65)


def test_a_histograms_text_is_reused_only_while_nothing_was_observed() -> None:
    from proxy.metrics import _histogram

    b = Buckets((0.1, 1.0))
    les = ('le="0.1"', 'le="1.0"', 'le="+Inf"')
    first: list[str] = []
    _histogram(first, "h", 'listener="a",', b, les)
    again: list[str] = []
    _histogram(again, "h", 'listener="a",', b, les)
    assert again == first and again[0] is first[0]
    b.observe(0.5)
    after: list[str] = []
    _histogram(after, "h", 'listener="a",', b, les)
    assert 'h_bucket{listener="a",le="1.0"} 1\n' in after[0]
    assert 'h_count{listener="a"} 1\n' in after[0]
    other: list[str] = []
    _histogram(other, "h", 'listener="b",', b, les)  # same numbers, other labels
    assert 'listener="b"' in other[0] and 'listener="a"' not in other[0]
