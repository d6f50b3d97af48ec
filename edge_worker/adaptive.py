"""Adaptive gamma: per session, the draft length that maximises committed tokens per second.

Model (standard for speculative decoding): each drafted token is accepted independently with
probability ``a`` until the first rejection, and every round commits one more token (the
recovered or bonus token). A round drafting ``g`` tokens then commits on average

    E(g) = (1 - a^(g+1)) / (1 - a)        (g + 1 when a = 1)

and costs ``g * t_draft + t_round`` seconds: ``t_draft`` per drafted token on the edge, and
``t_round`` from sending the batch to receiving its verdict (network, the pool's queueing, that
is its load, and the verify pass). With drafting ahead, a fully accepted round whose bonus token
the draft guessed (probability ~ ``a^(g+1)``) overlaps the next round's drafting with this
round's wait, so its cost is ``max(g * t_draft, t_round)``.

``a``, ``t_draft`` and ``t_round`` are exponentially weighted estimates, so the choice follows
changes in acceptance (a new topic) and in the pool's load. ``a`` is the maximum-likelihood
estimate under the model above: accepted tokens over (accepted tokens + rejections).
"""

from __future__ import annotations

from dataclasses import dataclass


def expected_tokens(acceptance: float, gamma: int) -> float:
    """Tokens one round commits on average: accepted drafts plus the recovered/bonus token."""
    if acceptance >= 1.0:
        return float(gamma + 1)
    return (1.0 - acceptance ** (gamma + 1)) / (1.0 - acceptance)


def round_cost(gamma: int, t_draft: float, t_round: float, acceptance: float = 0.0,
               draft_ahead: bool = False) -> float:
    """Expected seconds (or any unit) one round takes, drafting ahead or not."""
    serial = gamma * t_draft + t_round
    if not draft_ahead:
        return serial
    hit = acceptance ** (gamma + 1)  # all accepted and the bonus guessed
    return hit * max(gamma * t_draft, t_round) + (1.0 - hit) * serial


def best_gamma(acceptance: float, t_draft: float, t_round: float, gamma_min: int, gamma_max: int,
               draft_ahead: bool = False) -> int:
    """The gamma in [gamma_min, gamma_max] with the most expected tokens per unit of cost.

    Ties go to the smaller gamma (less wasted drafting, less verifier work).
    """
    best, best_rate = gamma_min, -1.0
    for gamma in range(gamma_min, gamma_max + 1):
        cost = round_cost(gamma, t_draft, t_round, acceptance, draft_ahead)
        rate = expected_tokens(acceptance, gamma) / cost if cost > 0 else float(gamma + 1)
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = gamma, rate
    return best


@dataclass
class GammaController:
    """Per-session gamma: fixed, or chosen each round from running estimates.

    ``prior_acceptance`` with ``prior_weight`` pseudo-observations keeps the first rounds from
    swinging to an extreme on one outcome; ``decay`` weighs recent rounds more.
    """

    gamma: int = 4
    adaptive: bool = False
    gamma_min: int = 1
    gamma_max: int = 8
    draft_ahead: bool = False
    decay: float = 0.8
    prior_acceptance: float = 0.6
    prior_weight: float = 2.0
    accepted_mass: float = 0.0
    trial_mass: float = 0.0
    t_draft: float | None = None  # ms per drafted token
    t_round: float | None = None  # ms from send to verdict

    def __post_init__(self) -> None:
        self.accepted_mass = self.prior_acceptance * self.prior_weight
        self.trial_mass = self.prior_weight

    @property
    def acceptance(self) -> float:
        return self.accepted_mass / self.trial_mass if self.trial_mass > 0 else self.prior_acceptance

    def choose(self, room: int) -> int:
        """Gamma for the next round, never more than ``room`` (tokens left minus the verdict's)."""
        gamma = self.gamma
        if self.adaptive:
            gamma = max(self.gamma_min, min(self.gamma_max, self.gamma))  # until costs are known
            if self.t_draft is not None and self.t_round is not None:
                gamma = best_gamma(self.acceptance, self.t_draft, self.t_round, self.gamma_min,
                                   self.gamma_max, self.draft_ahead)
        return max(0, min(gamma, room))

    def observe(self, drafted: int, accepted: int, draft_ms: float, round_ms: float) -> None:
        """Fold in one round: ``accepted`` of ``drafted`` tokens, and what drafting/waiting cost."""
        if drafted > 0:
            rejected = 1.0 if accepted < drafted else 0.0
            self.accepted_mass = self.decay * self.accepted_mass + accepted
            self.trial_mass = self.decay * self.trial_mass + accepted + rejected
            self.t_draft = _ewma(self.t_draft, draft_ms / drafted, self.decay)
        self.t_round = _ewma(self.t_round, round_ms, self.decay)


def _ewma(previous: float | None, value: float, decay: float) -> float:
    return value if previous is None else decay * previous + (1.0 - decay) * value
