"""A deployment's ``weight`` must be finite: ``.inf`` was accepted, and two deployments of
weight inf made weighted routing always pick the first listed (every key log(u)/inf is
-0.0, and the sort is stable)."""

import math

import pytest
import yaml

from llmrouter.config import parse_config
from llmrouter.errors import ConfigError


def group_with_weight(weight):
    return {"models": [{"name": "g", "deployments": [{"provider": "p", "model": "m", "weight": weight}]}]}


@pytest.mark.parametrize("weight", [math.inf, math.nan, yaml.safe_load("w: .inf")["w"]])
def test_a_weight_that_is_not_finite_is_refused_naming_the_field(weight):
    with pytest.raises(ConfigError) as info:
        parse_config(group_with_weight(weight), env={})
    assert "$.models[0].deployments[0].weight" in str(info.value)


@pytest.mark.parametrize("weight", [0, 1e-9, 2.5, 1e300])
def test_finite_weights_are_accepted(weight):
    assert parse_config(group_with_weight(weight), env={}).models[0].deployments[0].weight == weight
