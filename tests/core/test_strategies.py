"""Strategies on their own: the order they give a group's deployments."""

import random
from collections import Counter

import pytest

from llmrouter.config import Deployment
from llmrouter.deployments import DeploymentState
from llmrouter.strategies.weighted import weighted
from llmrouter.testing.scripted import ScriptedProvider

ROUNDS = 20_000


@pytest.fixture(autouse=True)
def seeded():
    """A fixed seed, so the statistical checks below cannot fail by chance."""
    state = random.getstate()
    random.seed(20240601)
    yield
    random.setstate(state)


def deployments(*weights):
    return [
        DeploymentState(
            id=f"d{i}",
            group="g",
            index=i,
            config=Deployment(provider="scripted", model="m", weight=weight),
            provider=ScriptedProvider(),
        )
        for i, weight in enumerate(weights)
    ]


def first_picks(weights):
    group = deployments(*weights)
    counts = Counter(weighted(group)[0].id for _ in range(ROUNDS))
    return [counts[d.id] / ROUNDS for d in group]


@pytest.mark.parametrize(
    ("weights", "shares"),
    [
        ((1, 3), (0.25, 0.75)),
        ((1, 1, 1), (1 / 3, 1 / 3, 1 / 3)),
        # u ** (1 / w) underflowed to 0.0 for small weights: 99.9% / 0.1% here, and the
        # first of three equal weights of 0.0005 got 55%.
        ((1e-6, 1e-6), (0.5, 0.5)),
        ((0.0005, 0.0005, 0.0005), (1 / 3, 1 / 3, 1 / 3)),
        ((2e-6, 1e-6), (2 / 3, 1 / 3)),
    ],
)
def test_weighted_picks_first_in_proportion_to_the_weights_whatever_their_scale(weights, shares):
    assert first_picks(weights) == pytest.approx(shares, abs=0.015)


def test_weight_zero_is_used_only_when_no_positive_weight_is_left():
    group = deployments(0, 1, 0, 2)
    orders = [[d.id for d in weighted(group)] for _ in range(ROUNDS)]
    assert all(set(order[:2]) == {"d1", "d3"} for order in orders)
    third = Counter(order[2] for order in orders)
    assert third["d0"] / ROUNDS == pytest.approx(0.5, abs=0.015), "at random among the zeros"


def test_weights_all_zero_pick_at_random():
    # Every zero had the same key: the first in config order was always picked.
    assert first_picks((0, 0)) == pytest.approx((0.5, 0.5), abs=0.015)
