"""Configuration: YAML decoded into msgspec Structs.

Loading order: read YAML -> interpolate ``${VAR}`` / ``${VAR:-default}`` in strings ->
apply ``LLMROUTER__SECTION__KEY=value`` environment overrides (values parsed as YAML
scalars; list items by index, e.g. ``LLMROUTER__MODELS__0__NAME``) -> decode. A bad
field fails at start-up with a :class:`~llmrouter.errors.ConfigError` naming its path.

Deployment keys that are not common to every provider (``base_url``, ``api_key``,
``device``...) are collected into ``Deployment.options`` and validated by the
provider's own ``Options`` struct when the router builds it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from llmrouter.accounting.config import AccountingConfig
from llmrouter.cache.config import CacheConfig
from llmrouter.errors import ConfigError
from llmrouter.telemetry.config import TelemetryConfig

__all__ = [
    "Config",
    "Cooldown",
    "Deployment",
    "GroupCache",
    "ModelGroup",
    "Price",
    "Retry",
    "RouterConfig",
    "ServerConfig",
    "Timeouts",
    "load_config",
    "parse_config",
]

ENV_PREFIX = "LLMROUTER__"

Strategy = Literal["priority", "weighted", "least_busy", "lowest_latency", "cheapest"]


class Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of config sections: unknown keys are errors (typos fail loudly)."""


# Bounds checked as the config is read: a negative retry count or timeout loaded, then
# failed every request (a 500, a 504 at once).
Seconds = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]
# Finite: with two deployments of `weight: .inf`, weighted routing always picked the
# first listed (NaN fails `ge`).
Weight = Annotated[float, msgspec.Meta(ge=0, le=sys.float_info.max)]


class Timeouts(Section):
    connect: Seconds = 10.0
    """Seconds to open a connection to an upstream."""
    first_token: Seconds | None = 60.0
    """Seconds until the first chunk of a stream (and the longest wait for a free slot)."""
    total: Seconds | None = 600.0
    """Seconds for one attempt (one deployment's call, stream included); retries and
    fallbacks each get their own."""


class Retry(Section):
    attempts: Count = 2
    """Tries after the first, per group: the next deployment after any error of one, the
    same deployment again only after a retryable error. 0: one try, then the fallbacks."""
    backoff_base: NonNegative = 0.05
    """First backoff in seconds; doubles each retry, with full jitter."""
    backoff_max: NonNegative = 2.0


class Cooldown(Section):
    failures: AtLeastOne = 3
    """Consecutive failures that take a deployment out of rotation."""
    seconds: NonNegative = 30.0


class Price(Section):
    """USD per million tokens."""

    input: NonNegative = 0.0
    output: NonNegative = 0.0
    cached_input: NonNegative | None = None


class Deployment(Section):
    provider: str
    model: str
    id: str | None = None
    """Stable name for readiness, metrics and the ledger; default ``provider/model``."""
    weight: Weight = 1.0
    priority: int = 0
    """Lower is tried first by the ``priority`` strategy."""
    max_concurrency: AtLeastOne | None = None
    timeouts: Timeouts | None = None
    price: Price | None = None
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    """Provider-specific keys (everything not named above)."""


class GroupCache(Section):
    ttl: float | None = None
    """Seconds an answer stays cached; None uses the cache's default."""
    cache_all: bool = False
    """Cache non-deterministic requests too (not only temperature 0 or a seed)."""
    enabled: bool = True


class ModelGroup(Section):
    name: str
    deployments: list[Deployment]
    aliases: list[str] = msgspec.field(default_factory=list)
    strategy: Strategy | None = None
    fallbacks: list[str] = msgspec.field(default_factory=list)
    """Other model groups to try, in order, when every deployment here failed."""
    retry: Retry | None = None
    timeouts: Timeouts | None = None
    cooldown: Cooldown | None = None
    cache: GroupCache | None = None


class RouterConfig(Section):
    strategy: Strategy = "priority"
    retry: Retry = msgspec.field(default_factory=Retry)
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    cooldown: Cooldown = msgspec.field(default_factory=Cooldown)
    allow_direct: bool = True
    """Accept ``provider/model`` names that are not configured groups."""
    max_direct_models: Count = 100
    """At most this many ``provider/model`` names become groups; clients choose them, so
    the rest get 404 rather than growing the model list and the metrics without bound."""
    default_max_tokens: AtLeastOne = 4096
    """Output bound for priced requests that set none, so a budget reservation is a true maximum."""


class ServerConfig(Section):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8000
    workers: Annotated[int, msgspec.Meta(ge=1)] = 1
    cors_origins: list[str] = msgspec.field(default_factory=list)
    max_request_bytes: Annotated[int, msgspec.Meta(ge=1)] = 8 * 1024 * 1024
    """Bodies larger than this get 413."""
    drain_seconds: Annotated[float, msgspec.Meta(ge=0)] | None = 25.0
    """On SIGTERM or Ctrl-C, how long requests in flight may take to finish; then they are
    cancelled (billed as cancelled, with their partial output) and the ledger is flushed
    before the process exits. Below Kubernetes' 30 s grace period by default. None: wait
    for every request, however long."""
    gc_tuning: bool = True
    """Once started, freeze what start-up allocated out of the garbage collector's way
    and collect young objects less often (~20% of the gateway's CPU with accounting,
    cache and metrics on; docs/benchmarks.md)."""


class Config(Section):
    models: list[ModelGroup] = msgspec.field(default_factory=list)
    router: RouterConfig = msgspec.field(default_factory=RouterConfig)
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    pricing: dict[str, Price] = msgspec.field(default_factory=dict)
    """Prices by model name (upstream model or group name); deployments may override."""
    pricing_file: str | None = None
    """A YAML file of ``model: {input, output, cached_input}`` merged under ``pricing``."""
    providers: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    """Per-provider defaults merged into each deployment's options (e.g. an API key)."""
    discover: bool = True
    """With no ``models``, register whatever the environment offers (see docs/providers/README.md)."""
    accounting: AccountingConfig = msgspec.field(default_factory=AccountingConfig)
    """Keys, ledger, budgets and limits (see docs/accounting.md)."""
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    """Metrics, JSON logs and traces (see docs/telemetry.md)."""
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    """Response cache backend, TTL and coalescing (see docs/cache.md)."""


_DEPLOYMENT_KEYS = frozenset(Deployment.__struct_fields__) - {"options"}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, env: Mapping[str, str], path: str) -> Any:
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if default is not None:
                return env.get(name) or default  # as the shell and compose: unset or empty
            if name in env:
                return env[name]
            raise ConfigError(f"config: environment variable {name} is not set - at `{path}`")

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _yaml_scalar(text: str) -> Any:
    """An override's value as YAML reads it (numbers, booleans, null, ``[...]``, ``{...}``),
    else the text itself: a mapping or a list only in flow syntax, so that ``::`` (an IPv6
    host) or ``tenant-a:`` (a key prefix) stay strings."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, (dict, list)) and not text.lstrip().startswith(("{", "[")):
        return text
    return value


def _apply_env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__") if k]
        if not keys:
            continue
        node: Any = data
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(f"config: {name}: no list item {key}")
                if last:
                    node[int(key)] = _yaml_scalar(raw)
                else:
                    node = node[int(key)]
            elif isinstance(node, dict):
                if last:
                    node[key] = _yaml_scalar(raw)
                else:
                    node = node.setdefault(key, {})
            else:
                where = ".".join(["$", *keys[:i]])
                raise ConfigError(f"config: {name}: `{where}` is not a mapping or a list")


def _split_deployment_options(data: dict[str, Any]) -> None:
    """Move a deployment's provider-specific keys into its ``options``. Values of the
    wrong shape are left as they are, for the schema's error that names them."""
    for group in _list_of_dicts(data.get("models")):
        for deployment in _list_of_dicts(group.get("deployments")):
            options = deployment.get("options") or {}
            if not isinstance(options, dict):
                continue
            options = dict(options)
            for key in [k for k in deployment if k not in _DEPLOYMENT_KEYS and k != "options"]:
                options[key] = deployment.pop(key)
            deployment["options"] = options


_INHERITED = ("retry", "timeouts", "cooldown")
"""Sections a model group may set in part: its fields not given are the router's."""


def _inherit_sections(data: dict[str, Any]) -> None:
    """Fill the fields a group's ``retry``, ``timeouts`` or ``cooldown`` leaves out from
    the router's, and a deployment's ``timeouts`` from its group's: a group that sets only
    ``timeouts.connect`` keeps the router's ``total``, not the built-in 600 s. Values of
    the wrong shape are left as they are, for the schema's error that names them."""
    router = data.get("router")
    router = router if isinstance(router, dict) else {}
    for group in _list_of_dicts(data.get("models")):
        for name in _INHERITED:
            above, own = router.get(name), group.get(name)
            if isinstance(above, dict) and isinstance(own, dict):
                group[name] = {**above, **own}
        above = group.get("timeouts", router.get("timeouts"))
        for deployment in _list_of_dicts(group.get("deployments")):
            own = deployment.get("timeouts")
            if isinstance(above, dict) and isinstance(own, dict):
                deployment["timeouts"] = {**above, **own}


def _list_of_dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {exc}") from exc


def parse_config(
    data: Mapping[str, Any] | None, env: Mapping[str, str] | None = None, *, base_dir: Path | None = None
) -> Config:
    """Decode a config mapping (as read from YAML), with interpolation and env overrides."""
    env = os.environ if env is None else env
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError("config: the top level must be a mapping")
    try:
        raw = _interpolate(dict(data or {}), env, "$")
    except RecursionError as exc:  # YAML aliases can make a node contain itself
        raise ConfigError("config: nested too deeply (or a YAML alias refers to itself)") from exc
    _apply_env_overrides(raw, env)
    _split_deployment_options(raw)
    _inherit_sections(raw)
    pricing_file = raw.get("pricing_file")
    if isinstance(pricing_file, str):
        file_prices = _read_yaml((base_dir or Path.cwd()) / pricing_file)
        file_prices = file_prices.get("pricing", file_prices) if isinstance(file_prices, dict) else None
        if not isinstance(file_prices, dict):
            raise ConfigError(f"config: {pricing_file} must map model names to prices")
        own = raw.get("pricing") or {}
        raw["pricing"] = {**file_prices, **own} if isinstance(own, dict) else own  # else: the schema's error
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config: {exc}") from exc
    _check_references(config)
    return config


def _check_references(config: Config) -> None:
    names: set[str] = set()
    for i, group in enumerate(config.models):
        for name in (group.name, *group.aliases):
            if name in names:
                raise ConfigError(f"config: model name {name!r} is defined twice - at `$.models[{i}]`")
            names.add(name)
        if not group.deployments:
            raise ConfigError(
                f"config: model group {group.name!r} has no deployments - at `$.models[{i}].deployments`"
            )
    for i, group in enumerate(config.models):
        for j, fallback in enumerate(group.fallbacks):
            if fallback not in names:
                raise ConfigError(
                    f"config: unknown fallback model {fallback!r} - at `$.models[{i}].fallbacks[{j}]`"
                )


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load the config file at ``path`` (or only defaults + environment when None)."""
    if path is None:
        return parse_config({}, env)
    path = Path(path)
    return parse_config(_read_yaml(path), env, base_dir=path.parent)
