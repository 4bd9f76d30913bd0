"""The scaling policy as a table: one pure function, no cluster, no database."""

from __future__ import annotations

import pytest

from flowfleet_operator.scaling import Decision, Depth, History, Policy, decide

POLICY = Policy(
    min_replicas=0, max_replicas=10, records_per_replica=100, scale_down_delay_seconds=60
)


def step(
    depth: Depth | None,
    current: int,
    policy: Policy = POLICY,
    history: History = (),
    now: float = 1000.0,
) -> Decision:
    return decide(policy, depth, current, history, now)


@pytest.mark.parametrize(
    ("depth", "current", "replicas", "reason"),
    [
        (Depth(ready=480, processing=0), 0, 5, "ScaledUp"),
        (Depth(ready=480, processing=0), 2, 5, "ScaledUp"),
        (Depth(ready=400, processing=80), 0, 5, "ScaledUp"),  # running work counts too
        (Depth(ready=1, processing=0), 0, 1, "ScaledUp"),  # any ready work lifts 0 to 1
        (Depth(ready=0, processing=0), 0, 0, "Steady"),
        (Depth(ready=500, processing=0), 5, 5, "Steady"),
    ],
)
def test_scale_up_is_immediate(depth: Depth, current: int, replicas: int, reason: str) -> None:
    decision = step(depth, current)
    assert (decision.replicas, decision.reason) == (replicas, reason)


def test_scale_message_says_why() -> None:
    decision = step(Depth(ready=480, processing=0), 2)
    assert decision.message == "2 -> 5: 480 ready, 100 per replica"


def test_clamped_to_max_with_the_reason() -> None:
    decision = step(Depth(ready=5000, processing=0), 0)
    assert decision.replicas == 10
    assert decision.limit == ("MaxReplicas", "wanted 50, maxReplicas is 10")


def test_clamped_to_min_with_the_reason() -> None:
    policy = Policy(
        min_replicas=2, max_replicas=10, records_per_replica=100, scale_down_delay_seconds=0
    )
    decision = step(Depth(ready=0, processing=0), 0, policy)
    assert decision.replicas == 2
    assert decision.limit == ("MinReplicas", "wanted 0, minReplicas is 2")


def test_within_limits_is_not_limited() -> None:
    assert step(Depth(ready=300, processing=0), 0).limit is None


def test_pin_overrides_everything() -> None:
    pinned = Policy(
        min_replicas=0,
        max_replicas=10,
        records_per_replica=100,
        scale_down_delay_seconds=60,
        pinned=2,
    )
    for depth in (Depth(ready=5000, processing=0), Depth(ready=0, processing=0), None):
        decision = step(depth, 7, pinned)
        assert (decision.replicas, decision.reason) == (2, "Pinned")
        assert decision.limit is not None and decision.limit[0] == "Pinned"


def test_pin_to_zero() -> None:
    pinned = Policy(
        min_replicas=1,
        max_replicas=10,
        records_per_replica=100,
        scale_down_delay_seconds=60,
        pinned=0,
    )
    assert step(Depth(ready=900, processing=0), 3, pinned).replicas == 0


def test_metric_failure_holds_replicas() -> None:
    for current in (0, 3, 10):
        decision = step(None, current)
        assert (decision.replicas, decision.reason) == (current, "MetricUnavailable")


def test_never_below_the_pods_that_hold_claims() -> None:
    # 3 pods each hold a claim; the backlog says 1 replica is enough: the busy ones stay.
    policy = Policy(
        min_replicas=0, max_replicas=10, records_per_replica=100, scale_down_delay_seconds=0
    )
    decision = step(Depth(ready=0, processing=3, busy_pods=3), 5, policy)
    assert decision.replicas == 3
    assert decision.reason == "ScaledDown"


def test_scale_down_waits_for_the_delay() -> None:
    history: History = ()
    replicas = 0
    decision = step(Depth(ready=480, processing=0), replicas, history=history, now=0.0)
    replicas, history = decision.replicas, decision.history
    assert replicas == 5
    # Work gone at t=10: held while t - 0 < 60 ...
    for now in (10.0, 30.0, 59.0):
        decision = step(Depth(ready=0, processing=0), replicas, history=history, now=now)
        assert (decision.replicas, decision.reason) == (5, "ScaleDownDelayed")
        history = decision.history
    # ... then down to the highest recommendation within the window: 0.
    decision = step(Depth(ready=0, processing=0), replicas, history=history, now=61.0)
    assert (decision.replicas, decision.reason) == (0, "ScaledDown")


def test_noisy_depth_does_not_flap() -> None:
    """A depth that jumps between high and low every 10 s tick never scales down while
    any high reading is within the delay, so replicas only ever rise."""
    noisy = [480, 90, 450, 120, 30, 470, 60, 400, 10, 480, 80, 300]
    history: History = ()
    replicas, seen = 0, []
    for i, ready in enumerate(noisy):
        decision = step(Depth(ready=ready, processing=0), replicas, history=history, now=i * 10.0)
        replicas, history = decision.replicas, decision.history
        seen.append(replicas)
    assert seen == [5] * len(noisy)
    changes = sum(1 for a, b in zip([0, *seen], seen, strict=False) if a != b)
    assert changes == 1


def test_history_window_stays_bounded() -> None:
    history: History = ()
    for i in range(1000):
        history = step(Depth(ready=100, processing=0), 1, history=history, now=i * 10.0).history
    assert len(history) <= 8  # 60 s window at 10 s ticks


def test_fresh_history_never_scales_in_at_once() -> None:
    """After an operator restart the current count counts as just wanted."""
    decision = step(Depth(ready=0, processing=0), 4, history=(), now=500.0)
    assert (decision.replicas, decision.reason) == (4, "ScaleDownDelayed")


def test_delay_shorter_than_the_tick_still_scales_in() -> None:
    """Ticks 1.1 s apart, a 1 s delay: every entry has aged out by the next tick, which
    must then scale in, not treat the history as fresh."""
    policy = Policy(
        min_replicas=0, max_replicas=10, records_per_replica=100, scale_down_delay_seconds=1
    )
    first = step(Depth(ready=400, processing=0), 0, policy, now=0.0)
    assert first.replicas == 4
    decision = step(Depth(ready=0, processing=0), 4, policy, first.history, now=1.1)
    assert (decision.replicas, decision.reason) == (0, "ScaledDown")


def test_drain_time_target_uses_the_measured_rate() -> None:
    policy = Policy(
        min_replicas=0,
        max_replicas=50,
        records_per_replica=100,
        scale_down_delay_seconds=60,
        target_drain_seconds=60,
    )
    # 2 replicas complete 1,200/min: 10 records/s each; 6,000 ready in 60 s needs 10.
    depth = Depth(ready=6000, processing=100, completions_per_minute=1200.0)
    decision = step(depth, 2, policy)
    assert decision.replicas == 10
    assert "drain in 60s" in decision.message


def test_drain_time_falls_back_to_records_per_replica_while_rate_unknown() -> None:
    policy = Policy(
        min_replicas=0,
        max_replicas=50,
        records_per_replica=100,
        scale_down_delay_seconds=60,
        target_drain_seconds=60,
    )
    for rate, current in ((None, 2), (0.0, 2), (600.0, 0)):
        depth = Depth(ready=6000, processing=0, completions_per_minute=rate)
        assert step(depth, current, policy).replicas == 50  # min(60, max 50)
