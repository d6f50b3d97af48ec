"""The router's choice, pure: prompt classes, per-drafter rates, first pick and re-pick.

A drafter's *rate* is committed tokens per second of round wall time: its committed tokens per
round over its drafting time per round plus the round's other time (transport, queueing,
verification). That other time does not depend on who drafted, so it is estimated from every
round of every drafter (shared); per drafter only acceptance and draft cost are estimated. (A
per-drafter wall time would be dominated by when each drafter happened to run on a busy
machine: measured, ``benchmarks/results/drafters_8x64_wallrate.md``.) Each per-drafter figure is
its rounds in this session on top of up to ``prior_rounds`` pseudo-rounds of what this process
saw for the same prompt class before, so a new session starts from experience and its own
rounds take over as they come in.

First pick: the best class rate once every drafter has class history; before that, a drafter
without history for the class is tried (exploration), and with no history at all, the drafter
whose declared ``domains`` fit the prompt (``long``, ``code``, ``prose``), else the first one.
Re-pick, after every settled round: leave the current drafter when another's estimate beats it
by ``margin`` (hysteresis against noise); once the current one has ``explore_after`` rounds, a
drafter with neither class history nor rounds in this session is tried (and judged after
``min_rounds`` rounds like any other).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CODE_MARKERS = ("def ", "import ", "return ", "class ", "):\n", "{\n", "};", "#include", "self.")
LONG_PROMPT_TOKENS = 256


@dataclass
class ArmStats:
    """One drafter's rounds (in a session, or for a prompt class across sessions)."""

    rounds: float = 0.0
    drafted: float = 0.0
    accepted: float = 0.0
    committed: float = 0.0
    seconds: float = 0.0  # wall time of the rounds, drafting included
    draft_s: float = 0.0  # time spent inside the drafter

    def observe(self, drafted: int, accepted: int, committed: int, seconds: float, draft_s: float) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.committed += committed
        self.seconds += max(seconds, 1e-6)
        self.draft_s += draft_s

    @property
    def rate(self) -> float:
        return self.committed / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, float]:
        return {"rounds": int(self.rounds), "drafted": int(self.drafted), "accepted": int(self.accepted),
                "acceptance": round(self.accepted / self.drafted, 4) if self.drafted else 0.0,
                "tokens_per_round": round(self.committed / self.rounds, 3) if self.rounds else 0.0,
                "tokens_per_s": round(self.rate, 2), "draft_ms": round(self.draft_s * 1000, 2)}


@dataclass
class Decision:
    round: int
    arm: str
    reason: str
    estimates: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"round": self.round, "drafter": self.arm, "reason": self.reason,
                "estimates": {k: round(v, 1) for k, v in self.estimates.items()}}


def prompt_class(context: list[int], tokenizer: Any) -> str:
    """``code``/``prose`` and ``long``/``short``: what the first pick and the history key on."""
    text = tokenizer.decode(context[-512:]) if tokenizer is not None else ""
    kind = "code" if sum(marker in text for marker in CODE_MARKERS) >= 2 else "prose"
    return f"{kind}-{'long' if len(context) >= LONG_PROMPT_TOKENS else 'short'}"


@dataclass
class RoutePolicy:
    arms: list[str]
    kinds: dict[str, str] = field(default_factory=dict)  # arm -> backend name (prompt_lookup, torch)
    domains: dict[str, list[str]] = field(default_factory=dict)  # arm -> declared prompt domains
    prior_rounds: float = 6.0
    margin: float = 0.1
    min_rounds: int = 2
    explore_after: int = 3
    decay: float = 0.995
    history: dict[tuple[str, str], ArmStats] = field(default_factory=dict)

    def learn(self, klass: str, arm: str, committed: int, seconds: float, draft_s: float) -> None:
        """Fold one round into the class history (slowly forgetting, so it follows drift)."""
        stats = self.history.setdefault((klass, arm), ArmStats())
        for name in ("rounds", "committed", "seconds", "draft_s"):
            setattr(stats, name, getattr(stats, name) * self.decay)
        stats.rounds += 1
        stats.committed += committed
        stats.seconds += max(seconds, 1e-6)
        stats.draft_s += draft_s

    def _per_round(self, klass: str, arm: str, session: ArmStats) -> tuple[float, float] | None:
        """(committed tokens, draft seconds) per round: session rounds on top of the class prior."""
        prior = self.history.get((klass, arm))
        weight = min(prior.rounds, self.prior_rounds) if prior is not None and prior.rounds else 0.0
        rounds, committed, draft_s = session.rounds, session.committed, session.draft_s
        if weight and prior is not None:
            rounds += weight
            committed += prior.committed / prior.rounds * weight
            draft_s += prior.draft_s / prior.rounds * weight
        return (committed / rounds, draft_s / rounds) if rounds else None

    def overhead(self, klass: str, stats: dict[str, ArmStats]) -> float:
        """Seconds of a round outside the drafter, from every drafter's rounds (session + class)."""
        rounds = seconds = 0.0
        for arm in self.arms:
            for source in (stats.get(arm), self.history.get((klass, arm))):
                if source is not None and source.rounds:
                    rounds += source.rounds
                    seconds += max(source.seconds - source.draft_s, 0.0)
        return seconds / rounds if rounds else 0.0

    def estimate(self, klass: str, arm: str, session: ArmStats, overhead: float = 0.0) -> float | None:
        """Expected committed tokens per second of wall time; None when nothing is known."""
        per_round = self._per_round(klass, arm, session)
        if per_round is None:
            return None
        committed, draft_s = per_round
        return committed / max(draft_s + overhead, 1e-6)

    def first_pick(self, klass: str, context: list[int], stats: dict[str, ArmStats]) -> Decision:
        estimates = self._estimates(klass, stats)
        unknown = [arm for arm in self.arms if arm not in estimates]
        if not unknown:
            best = max(estimates, key=estimates.__getitem__)
            return Decision(0, best, "best rate for this prompt class so far", estimates)
        if len(unknown) < len(self.arms):
            return Decision(0, unknown[0], "explore: no history for this prompt class", estimates)
        return Decision(0, self._by_domain(klass), "no history: the drafter declared for this prompt")

    def repick(self, klass: str, current: str, stats: dict[str, ArmStats], rounds: int) -> Decision | None:
        own = stats[current]
        if own.rounds < self.min_rounds:
            return None
        estimates = self._estimates(klass, stats)
        known = {arm: rate for arm, rate in estimates.items() if arm != current}
        if known:
            best = max(known, key=known.__getitem__)
            if known[best] > estimates.get(current, 0.0) * (1 + self.margin):
                return Decision(rounds, best, f"rate beats {current} by more than {self.margin:.0%}",
                                estimates)
        if own.rounds >= self.explore_after:
            untried = [arm for arm in self.arms if arm not in estimates]
            if untried:
                return Decision(rounds, untried[0], "explore: never measured for this prompt class",
                                estimates)
        return None

    def _estimates(self, klass: str, stats: dict[str, ArmStats]) -> dict[str, float]:
        found = {}
        overhead = self.overhead(klass, stats)
        for arm in self.arms:
            rate = self.estimate(klass, arm, stats.get(arm, ArmStats()), overhead)
            if rate is not None:
                found[arm] = rate
        return found

    def _by_domain(self, klass: str) -> str:
        kind, length = klass.split("-")
        for wanted in (length, kind):
            for arm in self.arms:
                if wanted in self.domains.get(arm, []):
                    return arm
        if length == "long":
            for arm in self.arms:
                if self.kinds.get(arm) == "prompt_lookup":
                    return arm
        return self.arms[0]
