"""The scaling policy: one pure function from depth, spec, history and now to a decision.

- work = ready pending records (due now) + processing records; desired =
  ceil(work / recordsPerReplica);
- with targetDrainSeconds and a measured per-replica completion rate: the replicas that
  drain the ready backlog in that time (recordsPerReplica while the rate is unknown);
- any ready work lifts 0 to at least 1; never below the pods that hold claims;
- clamped to [minReplicas, maxReplicas];
- up at once; down only to the highest recommendation of the last scaleDownDelaySeconds
  (HPA-style stabilization), so a noisy depth does not flap;
- a pinned spec.replicas overrides all of it;
- no depth (a failed read) keeps the current replicas: never scale to zero on a metric
  failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# (monotonic time, recommended replicas), oldest first.
History = tuple[tuple[float, int], ...]


@dataclass(frozen=True)
class Depth:
    """What the queue says about one flow."""

    ready: int
    processing: int
    pending: int = 0
    failed: int = 0
    busy_pods: int = 0  # distinct instance ids holding claims
    completions_per_minute: float | None = None  # None: not measured


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    records_per_replica: int
    scale_down_delay_seconds: float
    target_drain_seconds: float | None = None
    pinned: int | None = None


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str  # CamelCase, for events and conditions
    message: str
    limit: tuple[str, str] | None = None  # (reason, message) of ScalingLimited=True
    history: History = field(default=())

    def changes(self, current: int) -> bool:
        return self.replicas != current


def _per_replica_rate(depth: Depth, current: int) -> float | None:
    """Records per second one replica completes, when measured."""
    if not depth.completions_per_minute or current <= 0:
        return None
    return depth.completions_per_minute / 60.0 / current


def _raw(depth: Depth, policy: Policy, current: int) -> tuple[int, str]:
    rate = _per_replica_rate(depth, current)
    if policy.target_drain_seconds and rate:
        per_replica = rate * policy.target_drain_seconds
        want = math.ceil(depth.ready / per_replica) if depth.ready else 0
        why = (
            f"{depth.ready} ready, {rate * 60:.0f}/min per replica, "
            f"drain in {policy.target_drain_seconds:.0f}s"
        )
        # Running work keeps its pods whatever the backlog.
        return max(want, depth.busy_pods), why
    work = depth.ready + depth.processing
    want = math.ceil(work / policy.records_per_replica)
    running = f" + {depth.processing} processing" if depth.processing else ""
    return want, f"{depth.ready} ready{running}, {policy.records_per_replica} per replica"


def decide(
    policy: Policy, depth: Depth | None, current: int, history: History, now: float
) -> Decision:
    if policy.pinned is not None:
        return Decision(
            policy.pinned,
            "Pinned",
            f"spec.replicas pins {policy.pinned}; autoscaling paused until it is removed",
            limit=("Pinned", f"pinned at {policy.pinned} by spec.replicas"),
            history=history,
        )
    if depth is None:
        return Decision(
            current,
            "MetricUnavailable",
            f"queue depth unreadable; holding {current} replicas",
            history=history,
        )
    want, why = _raw(depth, policy, current)
    if depth.ready > 0:
        want = max(want, 1)
    # Scale-in removes idle pods only: never fewer pods than hold claims.
    want = max(want, depth.busy_pods)
    limit = None
    recommended = want
    if want < policy.min_replicas:
        recommended = policy.min_replicas
        limit = ("MinReplicas", f"wanted {want}, minReplicas is {policy.min_replicas}")
    elif want > policy.max_replicas:
        recommended = policy.max_replicas
        limit = ("MaxReplicas", f"wanted {want}, maxReplicas is {policy.max_replicas}")
    window_start = now - policy.scale_down_delay_seconds
    # A fresh history (operator start) remembers the current count as just wanted: a
    # restart never scales in before the delay has passed. Only a fresh one: a history
    # whose every entry has aged out (a delay no longer than the tick) must not keep
    # re-seeding the current count, or it would never scale in.
    kept = tuple(h for h in history if h[0] >= window_start)
    if not history and policy.scale_down_delay_seconds > 0:
        kept = ((now, current),)
    history = (*kept, (now, recommended))
    replicas = recommended if recommended >= current else max(n for _, n in history)
    if replicas != current:
        reason = "ScaledUp" if replicas > current else "ScaledDown"
        message = f"{current} -> {replicas}: {why}"
    elif recommended < current:
        reason = "ScaleDownDelayed"
        message = (
            f"holding {current} (wanted {recommended}) for scaleDownDelaySeconds "
            f"{policy.scale_down_delay_seconds:.0f}: {why}"
        )
    else:
        reason, message = "Steady", f"{current}: {why}"
    return Decision(replicas, reason, message, limit=limit, history=history)
