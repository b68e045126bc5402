"""Values the config loaded and that then broke every request (or the process) are refused
as it is read, naming their path; config errors are one line naming the file, the
environment variable or the pricing file the bad value came from."""

import math

import pytest

from llmrouter.config import load_config, parse_config
from llmrouter.errors import ConfigError
from llmrouter.registry import load_provider_class

INF = math.inf


def deployment(**extra):
    return {"provider": "remote", "model": "m", "base_url": "http://127.0.0.1:1/v1", **extra}


def group(name="g", deployments=None, **extra):
    return {"name": name, "deployments": deployments or [deployment()], **extra}


def accounting(section, **values):
    return {"accounting": {section: values}}


@pytest.mark.parametrize(
    ("data", "where"),
    [
        # rpm -1: every request 503 (OverflowError); tpm or concurrency -1: every one 429.
        # 0 admits nothing either (null is "no limit"); a key's own limits start at 1 too.
        (accounting("limits", rpm=-1), "$.accounting.limits.rpm"),
        (accounting("limits", rpm=0), "$.accounting.limits.rpm"),
        (accounting("limits", tpm=-1), "$.accounting.limits.tpm"),
        (accounting("limits", concurrency=0), "$.accounting.limits.concurrency"),
        (accounting("limits", end_user={"rpm": -1}), "$.accounting.limits.end_user.rpm"),
        (accounting("limits", end_user={"tpm": 0}), "$.accounting.limits.end_user.tpm"),
        (accounting("limits", end_user={"concurrency": -1}), "$.accounting.limits.end_user.concurrency"),
        # lease_seconds <= 0 turned the Redis concurrency limit off.
        (accounting("limits", lease_seconds=0), "$.accounting.limits.lease_seconds"),
        (accounting("limits", lease_seconds=-1), "$.accounting.limits.lease_seconds"),
        (accounting("limits", lease_seconds=INF), "$.accounting.limits.lease_seconds"),
        (accounting("auth", cache_seconds=-1), "$.accounting.auth.cache_seconds"),
        (accounting("database", pool_size=-1), "$.accounting.database.pool_size"),
        # A budget of -5: every priced request 429 "limit $0.000000".
        ({"accounting": {"budgets": [{"limit": -5}]}}, "$.accounting.budgets[0].limit"),
        ({"accounting": {"budgets": [{"limit": INF}]}}, "$.accounting.budgets[0].limit"),
        ({"accounting": {"budgets": [{"limit": math.nan}]}}, "$.accounting.budgets[0].limit"),
        ({"accounting": {"budgets": [{"limit": 5, "soft_limit": -1}]}}, "$.accounting.budgets[0].soft_limit"),
        # flush_interval <= 0: the ledger's writer spun at 70-80% CPU while idle.
        (accounting("ledger", flush_interval=0), "$.accounting.ledger.flush_interval"),
        (accounting("ledger", flush_interval=-1), "$.accounting.ledger.flush_interval"),
        (accounting("ledger", batch_size=0), "$.accounting.ledger.batch_size"),
        (accounting("ledger", shutdown_timeout=-1), "$.accounting.ledger.shutdown_timeout"),
        # A group's cache.ttl <= 0 turned its cache off without a word (the top level's
        # was already refused); .inf overflowed Redis's expiry.
        ({"models": [group(cache={"ttl": -5})]}, "$.models[0].cache.ttl"),
        ({"models": [group(cache={"ttl": 0})]}, "$.models[0].cache.ttl"),
        ({"models": [group(cache={"ttl": INF})]}, "$.models[0].cache.ttl"),
        ({"cache": {"ttl": INF}}, "$.cache.ttl"),
        # A price of .inf made the cost NaN, and the ledger refused the row.
        (
            {"models": [group(deployments=[deployment(price={"input": INF})])]},
            "$.models[0].deployments[0].price.input",
        ),
        ({"pricing": {"gpt-4o": {"output": INF}}}, "$.pricing.gpt-4o.output"),
        ({"pricing": {"gpt-4o": {"cached_input": INF}}}, "$.pricing.gpt-4o.cached_input"),
        # A name no request can give.
        ({"models": [group(name="")]}, "$.models[0].name"),
        ({"models": [group(aliases=[""])]}, "$.models[0].aliases[0]"),
        ({"models": [group(deployments=[deployment(id="")])]}, "$.models[0].deployments[0].id"),
    ],
)
def test_a_value_out_of_bounds_is_refused_naming_its_path(data, where):
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    assert f"`{where}`" in info.value.message
    assert "\n" not in info.value.message


def test_the_bounds_keep_the_values_that_mean_something():
    config = parse_config(
        {
            "accounting": {
                "limits": {"rpm": 1, "tpm": 1, "concurrency": 1, "lease_seconds": 0.5},
                "auth": {"cache_seconds": 0},  # no caching of verified keys
                "database": {"pool_size": 0},  # SQLAlchemy: no bound
                "budgets": [{"limit": 0, "soft_limit": 0}],  # no priced request
                "ledger": {"batch_size": 1, "flush_interval": 0.01, "shutdown_timeout": 0},
            },
            "models": [group(cache={"ttl": 0.5})],
            "pricing": {"free": {"input": 0, "output": 0}},
        },
        env={},
    )
    assert config.accounting.budgets[0].limit == 0
    assert config.models[0].cache is not None and config.models[0].cache.ttl == 0.5


@pytest.mark.parametrize(
    ("provider", "options", "where"),
    [
        # read_timeout -3: every request 504; max_connections 0 or -1: every request hung.
        ("remote", {"read_timeout": -3}, "$.read_timeout"),
        ("remote", {"connect_timeout": 0}, "$.connect_timeout"),
        ("remote", {"max_connections": 0}, "$.max_connections"),
        ("remote", {"max_connections": -1}, "$.max_connections"),
        ("remote", {"max_keepalive": -1}, "$.max_keepalive"),
        ("remote", {"max_context": 0}, "$.max_context"),
        # "not a url" passed `llmrouter models`; the deployment then failed to start (503s).
        ("remote", {"base_url": "not a url"}, "$.base_url"),
        ("remote", {"base_url": "gpu-1:8000/v1"}, "$.base_url"),
        ("openrouter", {"read_timeout": -3}, "$.read_timeout"),
        ("openrouter", {"connect_timeout": -1}, "$.connect_timeout"),
        ("openrouter", {"max_connections": 0}, "$.max_connections"),
        ("openrouter", {"max_context": 0}, "$.max_context"),
        ("openrouter", {"base_url": "openrouter.ai/api/v1"}, "$.base_url"),
        ("ollama", {"connect_timeout": 0}, "$.connect_timeout"),
        ("ollama", {"read_timeout": -1}, "$.read_timeout"),
        ("vllm", {"max_model_len": 0}, "$.max_model_len"),
        ("vllm", {"tensor_parallel_size": 0}, "$.tensor_parallel_size"),
        ("vllm", {"gpu_memory_utilization": 1.5}, "$.gpu_memory_utilization"),
    ],
)
def test_a_provider_option_out_of_bounds_is_refused_naming_it(provider, options, where):
    base = {"base_url": "http://127.0.0.1:1/v1"} if provider == "remote" else {}
    with pytest.raises(ConfigError) as info:
        load_provider_class(provider).from_config("m", {**base, **options}, path="models[g].deployments[0]")
    assert info.value.message.startswith("models[g].deployments[0]: ")
    assert f"`{where}`" in info.value.message


def test_a_number_or_boolean_may_come_from_an_environment_variable():
    data = {"server": {"port": "${PORT:-8000}", "gc_tuning": "${GC:-true}"}}
    config = parse_config(data, env={})
    assert (config.server.port, config.server.gc_tuning) == (8000, True)
    config = parse_config(data, env={"PORT": "9001", "GC": "false"})
    assert (config.server.port, config.server.gc_tuning) == (9001, False)
    with pytest.raises(ConfigError, match=r"`\$\.server\.port`"):
        parse_config(data, env={"PORT": "eighty"})


@pytest.mark.parametrize("value", ["0123", "true", "null", "1e3", "8000"])
def test_a_text_field_keeps_the_variable_as_text(value):
    data = {
        "server": {"host": "${VALUE}"},
        "models": [group(deployments=[deployment(api_key="${VALUE}", id="${VALUE}")])],
    }
    config = parse_config(data, env={"VALUE": value})
    (deployment_,) = config.models[0].deployments
    assert (config.server.host, deployment_.id, deployment_.options["api_key"]) == (value, value, value)
    provider = load_provider_class("remote").from_config("m", deployment_.options)
    assert provider.options.api_key == value  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("deployments", "where"),
    [
        # The router renamed the second `gpu-1#2`; the ledger and /ready named a deployment
        # the config does not have.
        ([[deployment(id="gpu-1")], [deployment(id="gpu-1", model="n")]], "$.models[1].deployments[0].id"),
        ([[deployment(id="gpu-1"), deployment(id="gpu-1", model="n")]], "$.models[0].deployments[1].id"),
        ([[deployment()], [deployment(id="remote/m", model="n")]], "$.models[1].deployments[0].id"),
    ],
)
def test_a_deployment_id_used_twice_is_refused(deployments, where):
    data = {"models": [group(name=f"g{i}", deployments=d) for i, d in enumerate(deployments)]}
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    assert f"`{where}`" in info.value.message


def test_the_same_model_twice_without_ids_is_accepted():
    data = {"models": [group(deployments=[deployment(), deployment(base_url="http://127.0.0.1:2/v1")])]}
    assert len(parse_config(data, env={}).models[0].deployments) == 2


def one_line_error(path, env=None):
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    message = info.value.message
    assert "\n" not in message and message.startswith("config: ")
    return message


def test_a_bad_price_in_the_pricing_file_names_the_file_and_the_model(tmp_path):
    (tmp_path / "prices.yaml").write_text("gpt-4o: {input: 2.5}\ngpt-x: {inptu: 2.5}\n")
    (tmp_path / "c.yaml").write_text("pricing_file: prices.yaml\n")
    message = one_line_error(tmp_path / "c.yaml")
    assert str(tmp_path / "prices.yaml") in message and "`inptu`" in message
    assert message.endswith("- at `$.pricing.gpt-x`")
    (tmp_path / "prices.yaml").write_text("pricing:\n  gpt-4o: 2.5\n")
    assert one_line_error(tmp_path / "c.yaml").endswith("got `float` - at `$.pricing.gpt-4o`")


def test_a_bad_price_in_the_config_names_the_file_and_the_model(tmp_path):
    (tmp_path / "c.yaml").write_text("pricing:\n  gpt-4.1: {output: -1}\n")
    message = one_line_error(tmp_path / "c.yaml")
    assert message.startswith(f"config: {tmp_path / 'c.yaml'}: ")
    assert message.endswith("- at `$.pricing.gpt-4.1.output`")


def test_an_error_names_the_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text("server: {port: eighty}\n")
    message = one_line_error(tmp_path / "c.yaml", env={"LLMROUTER__SERVER__HOST": "0.0.0.0"})
    assert message == f"config: {tmp_path / 'c.yaml'}: Expected `int`, got `str` - at `$.server.port`"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "LLMROUTER__SERVR__PORT",
            "1",
            "config: LLMROUTER__SERVR__PORT: Object contains unknown field `servr`",
        ),
        (
            "LLMROUTER__SERVER__PORT",
            "eighty",
            "config: LLMROUTER__SERVER__PORT: Expected `int`, got `str` - at `$.server.port`",
        ),
        (
            "LLMROUTER__PRICING__GPT-4O__INPUT",
            "-1",
            "config: LLMROUTER__PRICING__GPT-4O__INPUT: Expected `float` >= 0.0 - at `$.pricing.gpt-4o.input`",
        ),
    ],
)
def test_an_error_in_an_environment_override_names_the_variable(tmp_path, variable, value, expected):
    (tmp_path / "c.yaml").write_text("server: {port: 8000}\n")
    assert one_line_error(tmp_path / "c.yaml", env={variable: value}) == expected


def test_a_yaml_syntax_error_is_one_line_with_the_file_line_and_column(tmp_path):
    (tmp_path / "bad.yaml").write_text("server: {port: 1\n")
    message = one_line_error(tmp_path / "bad.yaml")
    assert message.startswith(f"config: {tmp_path / 'bad.yaml'}:2:1: not valid YAML: expected ',' or '}}'")
