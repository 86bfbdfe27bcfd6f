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

import math
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
    """``close``: aggregate now; ``fail``: end the round without aggregating; ``reason`` says why,
    and a failure's ``kind`` names it in one word of ``server.reasons.FAILURE_REASONS``."""

    close: bool = False
    fail: bool = False
    reason: str = ""
    kind: str = ""


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
            return Decision(
                fail=True, reason="closed by an operator before any upload was accepted", kind="operator"
            )
        return Decision(close=True, reason="admin")
    if quorum_holds(policy, tally):
        return Decision(close=True, reason="quorum" if policy.min_sites > 0 else "all")
    if tally.deadline_ms and tally.now_ms >= tally.deadline_ms:
        # At the deadline a round takes what it has, as long as the explicit minimum holds.
        if quorum_holds(policy, tally, sites_needed=max(1, policy.min_sites)):
            return Decision(close=True, reason="deadline")
        return Decision(
            fail=True,
            kind="deadline",
            reason=(
                f"deadline passed with {tally.accepted} accepted upload(s) "
                f"({tally.accepted_samples} of {tally.expected_samples} samples); "
                f"the quorum needs {max(1, policy.min_sites)} site(s)"
                + (f" and {policy.min_sample_fraction:.0%} of samples" if policy.min_sample_fraction else "")
            ),
        )
    return Decision()


# ---------------------------------------------------------------- why the run waits


@dataclass(frozen=True, slots=True)
class Waiting:
    """Why the run is not moving now: ``kind`` (one of WAITING_KINDS) and one line of ``text``.

    ``text`` changes only when something but the clock changes (the log prints it then, not
    every tick); ``line`` adds the open round's countdown to its deadline (0 = none).
    """

    kind: str = ""
    text: str = ""
    deadline_ms: int = 0

    def line(self, now_ms: int) -> str:
        """The reason as status shows it ("" when the run is moving)."""
        if self.kind != "quorum":
            return self.text
        if not self.deadline_ms:
            return f"{self.text}; no deadline"
        return f"{self.text}; deadline in {_duration(max(0, self.deadline_ms - now_ms))}"


# "": moving (a round is aggregating, or the next opens at the next tick).
WAITING_KINDS = ("", "sites", "paused", "quorum", "finished")


def waiting_to_open(*, next_round: int, alive: int, min_sites_to_open: int) -> Waiting:
    """Between rounds: the next one waits for ``min_sites_to_open`` sites alive."""
    if alive >= min_sites_to_open:
        return Waiting()
    return Waiting(
        "sites",
        f"waiting for {min_sites_to_open} sites alive to open round {next_round}: "
        f"{alive} of {min_sites_to_open} alive (min_sites_to_open)",
    )


def waiting_for_quorum(policy: RoundPolicy, tally: Tally, round_number: int) -> Waiting:
    """An open round waits for its quorum (uploads, and samples if the policy asks), or its deadline."""
    needed = required_sites(policy, tally)
    who = f"min_sites={policy.min_sites}" if policy.min_sites else "every live participant"
    text = (
        f"round {round_number} waits for its quorum: {tally.accepted} of {needed} upload(s) accepted "
        f"({who}; {tally.alive_participants} live participant(s))"
    )
    if policy.min_sample_fraction > 0:
        samples = math.ceil(policy.min_sample_fraction * tally.expected_samples)
        text += (
            f", {tally.accepted_samples} of {samples} samples "
            f"({policy.min_sample_fraction:.0%} of {tally.expected_samples})"
        )
    return Waiting("quorum", text, tally.deadline_ms)


def paused(reason: str, *, open_round: int, next_round: int) -> Waiting:
    """Paused by the operator: nothing opens, and the open round (if any) closes only on request."""
    said = reason or "no reason given"
    if open_round:
        then = f"round {open_round} takes uploads but closes only on resume or close-round"
    else:
        then = f"round {next_round} opens on resume"
    return Waiting("paused", f"paused by the operator ({said}); {then}")


def finished(last_round: int) -> Waiting:
    return Waiting("finished", f"finished: round {last_round}, the last, is published")


def describe(policy: RoundPolicy) -> str:
    """The round policy in force, one line (what the log and ``gdfed admin policy`` print)."""
    return (
        f"min_sites={policy.min_sites or 'all'} min_sample_fraction={policy.min_sample_fraction:g} "
        f"deadline={f'{policy.deadline_s}s' if policy.deadline_s else 'none'} "
        f"min_sites_to_open={policy.min_sites_to_open}"
    )


def _duration(ms: int) -> str:
    seconds = math.ceil(ms / 1000)
    if seconds < 120:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 120:
        return f"{minutes} min {seconds} s"
    return f"{minutes // 60} h {minutes % 60} min"
