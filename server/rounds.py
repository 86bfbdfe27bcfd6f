"""The round state machine: which transitions exist, and when a round closes.

    OPEN ──(a site trains)──> TRAINING ──(an upload starts)──> COLLECTING
      │                          │                                 │
      └──────────────(quorum, deadline or admin close)─────────────┘
                                 │
                                 v
                            AGGREGATING ──> PUBLISHED
                                 │
                                 └────────> FAILED (with a reason)

A round may also go straight to FAILED from any open state, when its
deadline passes (or an operator closes it) without the uploads its quorum
needs. Pure logic: no I/O, no clock, no gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.config import RoundPolicy
from server.records import RoundState

_ALLOWED: dict[RoundState, frozenset[RoundState]] = {
    RoundState.OPEN: frozenset(
        {RoundState.TRAINING, RoundState.COLLECTING, RoundState.AGGREGATING, RoundState.FAILED}
    ),
    RoundState.TRAINING: frozenset({RoundState.COLLECTING, RoundState.AGGREGATING, RoundState.FAILED}),
    RoundState.COLLECTING: frozenset({RoundState.AGGREGATING, RoundState.FAILED}),
    RoundState.AGGREGATING: frozenset({RoundState.PUBLISHED, RoundState.FAILED}),
    RoundState.PUBLISHED: frozenset(),
    RoundState.FAILED: frozenset(),
}


def can_move(current: RoundState, target: RoundState) -> bool:
    """Whether ``current -> target`` is a transition of the machine."""
    return target in _ALLOWED[current]


def advance(current: RoundState, target: RoundState) -> RoundState:
    """``target`` if the machine allows it from ``current``; ValueError otherwise."""
    if not can_move(current, target):
        raise ValueError(f"round cannot go from {current.name} to {target.name}")
    return target


def progress(current: RoundState, target: RoundState) -> RoundState:
    """Move forward through OPEN -> TRAINING -> COLLECTING only; never backwards."""
    order = (RoundState.OPEN, RoundState.TRAINING, RoundState.COLLECTING)
    if current in order and target in order and order.index(target) > order.index(current):
        return target
    return current


@dataclass(frozen=True, slots=True, kw_only=True)
class Tally:
    """What a round has, at one instant."""

    accepted: int  # uploads accepted
    accepted_samples: int
    alive_participants: int  # participating sites not dropped
    expected_samples: int  # samples the participating sites declared
    now_ms: int
    deadline_ms: int  # 0 = none


@dataclass(frozen=True, slots=True)
class Decision:
    """``close``: aggregate now; ``fail``: end the round without aggregating; ``reason`` says why."""

    close: bool = False
    fail: bool = False
    reason: str = ""


def required_sites(policy: RoundPolicy, tally: Tally) -> int:
    """Accepted uploads a round needs: the policy's minimum, or every participant still alive."""
    return policy.min_sites if policy.min_sites > 0 else max(1, tally.alive_participants)


def quorum_holds(policy: RoundPolicy, tally: Tally, *, sites_needed: int | None = None) -> bool:
    """Enough uploads, holding enough of the participants' samples."""
    needed = required_sites(policy, tally) if sites_needed is None else sites_needed
    if tally.accepted < needed:
        return False
    if policy.min_sample_fraction > 0:
        return tally.accepted_samples >= policy.min_sample_fraction * tally.expected_samples
    return True


def decide(policy: RoundPolicy, tally: Tally, *, admin_close: bool = False) -> Decision:
    """Whether an open round should close now, fail now, or go on."""
    if admin_close:
        if tally.accepted == 0:
            return Decision(fail=True, reason="closed by an operator before any upload was accepted")
        return Decision(close=True, reason="admin")
    if quorum_holds(policy, tally):
        return Decision(close=True, reason="quorum" if policy.min_sites > 0 else "all")
    if tally.deadline_ms and tally.now_ms >= tally.deadline_ms:
        # At the deadline a round takes what it has, as long as the explicit minimum holds.
        if quorum_holds(policy, tally, sites_needed=max(1, policy.min_sites)):
            return Decision(close=True, reason="deadline")
        return Decision(
            fail=True,
            reason=(
                f"deadline passed with {tally.accepted} accepted upload(s) "
                f"({tally.accepted_samples} of {tally.expected_samples} samples); "
                f"the quorum needs {max(1, policy.min_sites)} site(s)"
                + (f" and {policy.min_sample_fraction:.0%} of samples" if policy.min_sample_fraction else "")
            ),
        )
    return Decision()
