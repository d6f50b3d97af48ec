"""The router's choice, pure: prompt classes, per-drafter rates, first pick and re-pick.

A drafter's *rate* is committed tokens per second of round wall time (drafting included). The
estimate for a drafter in a session is its rounds in this session on top of up to
``prior_rounds`` pseudo-rounds of what this process saw for the same prompt class before, so a
new session starts from experience and its own rounds take over as they come in.

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

    def observe(self, drafted: int, accepted: int, committed: int, seconds: float) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.committed += committed
        self.seconds += max(seconds, 1e-6)

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

    def learn(self, klass: str, arm: str, committed: int, seconds: float) -> None:
        """Fold one round into the class history (slowly forgetting, so it follows drift)."""
        stats = self.history.setdefault((klass, arm), ArmStats())
        for name in ("rounds", "committed", "seconds"):
            setattr(stats, name, getattr(stats, name) * self.decay)
        stats.rounds += 1
        stats.committed += committed
        stats.seconds += max(seconds, 1e-6)

    def estimate(self, klass: str, arm: str, session: ArmStats) -> float | None:
        """Session rounds on top of the class prior; None when nothing is known."""
        prior = self.history.get((klass, arm))
        weight = min(prior.rounds, self.prior_rounds) if prior is not None and prior.rounds else 0.0
        committed, seconds = session.committed, session.seconds
        if weight and prior is not None:
            committed += prior.committed / prior.rounds * weight
            seconds += prior.seconds / prior.rounds * weight
        return committed / seconds if seconds else None

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
        for arm in self.arms:
            rate = self.estimate(klass, arm, stats.get(arm, ArmStats()))
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
