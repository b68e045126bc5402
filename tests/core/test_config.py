import re

import pytest

from llmrouter.config import load_config, parse_config
from llmrouter.errors import ConfigError

MINIMAL = """
models:
  - name: mock-gpt
    deployments:
      - provider: remote
        model: mock-gpt
        base_url: http://127.0.0.1:18000/v1
"""


def test_minimal_config_puts_provider_keys_into_options(tmp_path):
    path = tmp_path / "llmrouter.yaml"
    path.write_text(MINIMAL)
    config = load_config(path, env={})
    deployment = config.models[0].deployments[0]
    assert deployment.provider == "remote"
    assert deployment.options == {"base_url": "http://127.0.0.1:18000/v1"}
    assert config.server.port == 8000


def test_env_interpolation_with_default_and_missing():
    data = {
        "models": [
            {
                "name": "g",
                "deployments": [
                    {
                        "provider": "remote",
                        "model": "m",
                        "api_key": "${KEY}",
                        "base_url": "${URL:-http://x/v1}",
                    }
                ],
            }
        ]
    }
    config = parse_config(data, env={"KEY": "sk-1"})
    assert config.models[0].deployments[0].options == {"api_key": "sk-1", "base_url": "http://x/v1"}
    # Set but empty takes the default too, as in the shell and compose (before: "").
    config = parse_config(data, env={"KEY": "", "URL": ""})
    assert config.models[0].deployments[0].options == {"api_key": "", "base_url": "http://x/v1"}
    with pytest.raises(ConfigError, match=r"KEY is not set - at `\$.models\[0\].deployments\[0\].api_key`"):
        parse_config(data, env={})


def test_environment_overrides_sections_and_list_items():
    env = {
        "LLMROUTER__SERVER__PORT": "9001",
        "LLMROUTER__ROUTER__RETRY__ATTEMPTS": "5",
        "LLMROUTER__MODELS__0__STRATEGY": "least_busy",
    }
    data = {"models": [{"name": "g", "deployments": [{"provider": "remote", "model": "m"}]}]}
    config = parse_config(data, env=env)
    assert config.server.port == 9001
    assert config.router.retry.attempts == 5
    assert config.models[0].strategy == "least_busy"
    # Strings that YAML would read as a mapping stay strings (before: "Expected `str`").
    env = {"LLMROUTER__SERVER__HOST": "::", "LLMROUTER__SERVER__CORS_ORIGINS": "[http://a.example]"}
    config = parse_config(data, env=env)
    assert (config.server.host, config.server.cors_origins) == ("::", ["http://a.example"])


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"server": {"port": "eighty"}}, "$.server.port"),
        ({"server": {"prot": 1}}, "prot"),
        (
            {
                "models": [
                    {"name": "g", "deployments": [{"provider": "remote", "model": "m", "weight": "heavy"}]}
                ]
            },
            "$.models[0].deployments[0].weight",
        ),
        ({"models": [{"name": "g", "deployments": []}]}, "$.models[0].deployments"),
        (
            {
                "models": [
                    {"name": "g", "deployments": [{"provider": "p", "model": "m"}], "fallbacks": ["nope"]}
                ]
            },
            "$.models[0].fallbacks[0]",
        ),
        ({"router": {"strategy": "fastest"}}, "$.router.strategy"),
        # Wrong shapes where the loader looks before the schema does (a TypeError before).
        ({"models": 5}, "$.models"),
        ({"models": [{"name": "g", "deployments": True}]}, "$.models[0].deployments"),
        (
            {"models": [{"name": "g", "deployments": [{"provider": "p", "model": "m", "options": 3}]}]},
            "$.models[0].deployments[0].options",
        ),
        ({"pricing": ["gpt-4o"]}, "$.pricing"),
        # `llmrouter serve --port 99999` started and said it listened on port 99999.
        ({"server": {"port": 70000}}, "$.server.port"),
        ({"server": {"workers": 0}}, "$.server.workers"),
        ({"server": {"max_request_bytes": 0}}, "$.server.max_request_bytes"),
        # Loaded before, then failed every request (a 500 for attempts -1, a 504 for total -1).
        ({"router": {"retry": {"attempts": -1}}}, "$.router.retry.attempts"),
        ({"router": {"timeouts": {"total": -1}}}, "$.router.timeouts.total"),
        ({"router": {"timeouts": {"connect": 0}}}, "$.router.timeouts.connect"),
        ({"router": {"cooldown": {"failures": 0}}}, "$.router.cooldown.failures"),
        ({"router": {"default_max_tokens": 0}}, "$.router.default_max_tokens"),
        ({"router": {"max_direct_models": -1}}, "$.router.max_direct_models"),
        (
            {
                "models": [
                    {"name": "g", "deployments": [{"provider": "p", "model": "m", "max_concurrency": 0}]}
                ]
            },
            "$.models[0].deployments[0].max_concurrency",
        ),
        (
            {"models": [{"name": "g", "deployments": [{"provider": "p", "model": "m", "weight": -1}]}]},
            "$.models[0].deployments[0].weight",
        ),
        ({"pricing": {"m": {"input": -1}}}, "$.pricing"),
    ],
)
def test_bad_config_names_the_field(data, where):
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    assert where in str(info.value)


def test_duplicate_model_names_are_rejected():
    group = {"name": "g", "deployments": [{"provider": "p", "model": "m"}], "aliases": ["a"]}
    with pytest.raises(ConfigError, match="defined twice"):
        parse_config({"models": [group, {**group, "name": "a", "aliases": []}]}, env={})


def test_pricing_file_is_merged(tmp_path):
    (tmp_path / "prices.yaml").write_text("gpt-4o: {input: 2.5, output: 10}\n")
    (tmp_path / "c.yaml").write_text("pricing_file: prices.yaml\npricing:\n  mine: {input: 1}\n")
    config = load_config(tmp_path / "c.yaml", env={})
    assert config.pricing["gpt-4o"].output == 10
    assert config.pricing["mine"].input == 1


@pytest.mark.parametrize(
    ("data", "variable", "where"),
    [
        ({"router": 5}, "LLMROUTER__ROUTER__RETRY__ATTEMPTS", "`$.router`"),
        ({"router": {"retry": "x"}}, "LLMROUTER__ROUTER__RETRY__ATTEMPTS", "`$.router.retry`"),
        ({"models": [5]}, "LLMROUTER__MODELS__0__NAME", "`$.models.0`"),
    ],
)
def test_an_override_through_a_scalar_is_a_config_error(data, variable, where):
    with pytest.raises(ConfigError, match=re.escape(f"{variable}: {where} is not a mapping or a list")):
        parse_config(data, env={variable: "1"})


def test_a_pricing_file_of_the_wrong_shape_is_a_config_error(tmp_path):
    for text in ("- gpt-4o\n", "pricing: 5\n"):
        (tmp_path / "prices.yaml").write_text(text)
        with pytest.raises(ConfigError, match=re.escape("prices.yaml must map model names to prices")):
            parse_config({"pricing_file": "prices.yaml"}, env={}, base_dir=tmp_path)


def test_a_yaml_alias_that_contains_itself_is_a_config_error(tmp_path):
    (tmp_path / "c.yaml").write_text("models: &loop [*loop]\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_config(tmp_path / "c.yaml", env={})


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"\xff\xfemodels: []\n")  # was a UnicodeDecodeError traceback
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(tmp_path / "c.yaml", env={})


def test_a_group_or_deployment_sets_only_the_fields_it_names():
    # Before: a group that set only timeouts.connect got the built-in total (600 s), not
    # the router's; likewise retry and cooldown fields, and a deployment's timeouts.
    from llmrouter import Router

    config = parse_config(
        {
            "router": {
                "timeouts": {"connect": 10, "first_token": 0.2, "total": 1},
                "retry": {"attempts": 0, "backoff_max": 0.5},
                "cooldown": {"failures": 1, "seconds": 5},
            },
            "models": [
                {
                    "name": "g",
                    "timeouts": {"connect": 2},
                    "retry": {"attempts": 4},
                    "cooldown": {"seconds": 60},
                    "deployments": [
                        {"provider": "remote", "model": "a", "base_url": "http://127.0.0.1:1/v1"},
                        {
                            "provider": "remote",
                            "model": "b",
                            "base_url": "http://127.0.0.1:1/v1",
                            "timeouts": {"first_token": None},
                        },
                    ],
                }
            ],
        }
    )
    (group,) = config.models
    assert (group.timeouts.connect, group.timeouts.first_token, group.timeouts.total) == (2, 0.2, 1)
    assert (group.retry.attempts, group.retry.backoff_max) == (4, 0.5)
    assert (group.cooldown.failures, group.cooldown.seconds) == (1, 60)
    own = group.deployments[1].timeouts
    assert own is not None and (own.connect, own.first_token, own.total) == (2, None, 1)
    router = Router(config)
    state = router.groups["g"]
    assert [state.timeouts_for(d).total for d in state.deployments] == [1, 1]
