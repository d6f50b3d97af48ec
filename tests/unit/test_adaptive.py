"""Adaptive gamma: the expected-tokens model, the cost model and the per-session controller."""

from __future__ import annotations

import pytest

from edge_worker.adaptive import GammaController, best_gamma, expected_tokens, round_cost


def test_expected_tokens_formula() -> None:
    assert expected_tokens(0.0, 5) == 1.0  # only the recovered token
    assert expected_tokens(1.0, 4) == 5.0  # every draft and the bonus
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(0.8, 4) == pytest.approx(sum(0.8**i for i in range(5)))


def test_round_cost_with_and_without_drafting_ahead() -> None:
    assert round_cost(4, 2.0, 10.0) == 18.0
    assert round_cost(4, 2.0, 10.0, acceptance=1.0, draft_ahead=True) == 10.0  # drafting hidden
    assert round_cost(4, 2.0, 10.0, acceptance=0.0, draft_ahead=True) == 18.0  # never hits
    assert 10.0 < round_cost(4, 2.0, 10.0, acceptance=0.8, draft_ahead=True) < 18.0


@pytest.mark.parametrize("acceptance", [0.0, 0.3, 0.6, 0.8, 0.95, 1.0])
@pytest.mark.parametrize(("t_draft", "t_round"), [(1.0, 0.5), (1.0, 10.0), (2.0, 80.0), (0.1, 1.0)])
@pytest.mark.parametrize("ahead", [False, True])
def test_best_gamma_maximises_tokens_per_time(acceptance, t_draft, t_round, ahead) -> None:
    chosen = best_gamma(acceptance, t_draft, t_round, 1, 12, ahead)
    rates = {g: expected_tokens(acceptance, g) / round_cost(g, t_draft, t_round, acceptance, ahead)
             for g in range(1, 13)}
    assert 1 <= chosen <= 12
    assert rates[chosen] == pytest.approx(max(rates.values()))


def test_best_gamma_follows_latency_and_acceptance() -> None:
    assert best_gamma(0.9, 1.0, 80.0, 1, 8) == 8  # long round trip, good draft: draft a lot
    assert best_gamma(0.1, 1.0, 1.0, 1, 8) == 1  # poor draft: draft little
    assert best_gamma(0.7, 1.0, 20.0, 2, 5) in range(2, 6)  # bounds hold
    assert best_gamma(0.7, 1.0, 2.0, 1, 8) < best_gamma(0.7, 1.0, 40.0, 1, 8)


def test_fixed_controller_keeps_gamma_within_room() -> None:
    fixed = GammaController(gamma=5)
    fixed.observe(5, 0, 5.0, 100.0)
    assert fixed.choose(room=20) == 5 and fixed.choose(room=2) == 2 and fixed.choose(room=0) == 0


def test_adaptive_controller_starts_at_gamma_then_adapts() -> None:
    ctl = GammaController(gamma=4, adaptive=True, gamma_min=1, gamma_max=8)
    assert ctl.choose(room=100) == 4  # no costs measured yet
    for _ in range(10):  # every draft accepted, slow round trips: long drafts pay
        ctl.observe(drafted=ctl.choose(100), accepted=ctl.choose(100), draft_ms=4.0, round_ms=80.0)
    assert ctl.acceptance > 0.9 and ctl.choose(room=100) == 8 and ctl.choose(room=3) == 3
    for _ in range(20):  # everything rejected, round trips short: back to the minimum
        gamma = ctl.choose(100)
        ctl.observe(drafted=gamma, accepted=0, draft_ms=4.0 * gamma, round_ms=2.0)
    assert ctl.acceptance < 0.3 and ctl.choose(room=100) == 1


def test_acceptance_estimate_is_accepted_over_trials() -> None:
    ctl = GammaController(adaptive=True, decay=1.0, prior_weight=0.0)
    ctl.observe(4, 2, 1.0, 1.0)  # 2 accepted then a rejection: 2 / 3
    ctl.observe(4, 4, 1.0, 1.0)  # all 4 accepted, no rejection: (2 + 4) / (3 + 4)
    assert ctl.acceptance == pytest.approx(6 / 7)
    assert ctl.t_draft == pytest.approx(0.25) and ctl.t_round == pytest.approx(1.0)
