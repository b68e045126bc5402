"""Configuration: YAML decoded into msgspec Structs.

Loading order: read YAML -> interpolate ``${VAR}`` / ``${VAR:-default}`` in strings ->
apply ``LLMROUTER__SECTION__KEY=value`` environment overrides (values parsed as YAML
scalars; list items by index, e.g. ``LLMROUTER__MODELS__0__NAME``) -> decode. A bad
field fails at start-up with a :class:`~llmrouter.errors.ConfigError` of one line naming
its path, and the file or the environment variable it came from.

Decoding reads a string as the number or boolean it spells where the field is one
(``port: ${PORT:-8000}``: interpolation yields text), and leaves it text where the field
is text (``api_key: ${KEY}`` with ``KEY=0123`` stays ``"0123"``).

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
from llmrouter.cache.config import CacheConfig, TtlSeconds
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
    "check_options",
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
# Finite: a price of .inf made the cost NaN, and the ledger refused the row.
UsdPerMillion = Annotated[float, msgspec.Meta(ge=0, le=sys.float_info.max)]
# A model group named "" was accepted, and no request can name it.
Name = Annotated[str, msgspec.Meta(min_length=1)]


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

    input: UsdPerMillion = 0.0
    output: UsdPerMillion = 0.0
    cached_input: UsdPerMillion | None = None


class Deployment(Section):
    provider: str
    model: str
    id: Name | None = None
    """Stable name for readiness, metrics and the ledger; default ``provider/model``.
    Unique: the router would rename a second one ``id#2``."""
    weight: Weight = 1.0
    priority: int = 0
    """Lower is tried first by the ``priority`` strategy."""
    max_concurrency: AtLeastOne | None = None
    timeouts: Timeouts | None = None
    price: Price | None = None
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    """Provider-specific keys (everything not named above)."""


class GroupCache(Section):
    ttl: TtlSeconds | None = None
    """Seconds an answer stays cached; None uses the cache's default."""
    cache_all: bool = False
    """Cache non-deterministic requests too (not only temperature 0 or a seed)."""
    enabled: bool = True


class ModelGroup(Section):
    name: Name
    deployments: list[Deployment]
    aliases: list[Name] = msgspec.field(default_factory=list)
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
    """Per-provider defaults merged into each deployment's options (e.g. an API key), and
    the options of ``provider/model`` groups. ``serve`` and ``models`` check each name
    and option against the provider (:func:`check_options`); this module loads none."""
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


Override = tuple[str, tuple[str, ...]]
"""An environment override applied: the variable, and the keys of the path it set."""


def _apply_env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> list[Override]:
    """Set each ``LLMROUTER__...`` variable's value in ``data``; returns what was set, so
    that a bad value is reported with the variable's name rather than only a path the
    file does not have (``LLMROUTER__SERVR__PORT``: "unknown field `servr`")."""
    applied: list[Override] = []
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__") if k]
        if not keys:
            continue
        applied.append((name, tuple(keys)))
        node: Any = data
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise _Sourced(f"config: {name}: no list item {key}")
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
                raise _Sourced(f"config: {name}: `{where}` is not a mapping or a list")
    return applied


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
        raise _Sourced(f"config: cannot read {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise _Sourced(f"config: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise _Sourced(f"config: {_yaml_problem(path, exc)}") from exc


def _yaml_problem(path: Path, exc: Exception) -> str:
    """A YAML syntax error in one line, ``FILE:LINE:COLUMN: ...`` as compilers write it
    (PyYAML's own message is eight lines, and names ``<unicode string>``, not the file)."""
    problem_mark, context_mark = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
    where = f"{path}:{problem_mark.line + 1}:{problem_mark.column + 1}" if problem_mark else str(path)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if context and context_mark:
        problem += f" ({context} at {context_mark.line + 1}:{context_mark.column + 1})"
    return " ".join(f"{where}: not valid YAML: {problem}".split())


class _Sourced(ConfigError):
    """A config error whose message names where the bad value came from (an environment
    variable, the pricing file, a file that could not be read): :func:`load_config` does
    not put the config file's name before it."""


_AT = re.compile(r" - at `\$([^`]*)`$")
_STEP = re.compile(r"\.([^.\[]+)|\[([^\]]*)\]")
_FIELD = re.compile(r"Object (?:contains unknown|missing required) field `([^`]*)`")


def _under(exc: msgspec.ValidationError, root: str) -> str:
    """msgspec's message with its path put under ``root``: converting a part of the config
    on its own, msgspec names ``$`` where the config has ``$.pricing.gpt-4o``."""
    message = str(exc)
    match = _AT.search(message)
    if match is None:
        return f"{message} - at `{root}`"
    return f"{message[: match.start()]} - at `{root}{match.group(1)}`"


def _steps(message: str) -> tuple[str, ...]:
    """The keys of the path a msgspec message names, ending with the field it names (one
    unknown or missing); ``...`` for a mapping's key, which msgspec does not say."""
    match = _AT.search(message)
    steps = [attribute or item for attribute, item in _STEP.findall(match.group(1))] if match else []
    field = _FIELD.match(message)
    return (*steps, field.group(1)) if field else tuple(steps)


def _set_by(steps: tuple[str, ...], overrides: list[Override]) -> str | None:
    """The variable that set the value at ``steps`` (or a key above or below it)."""
    if not steps:
        return None
    for name, keys in overrides:
        if all(step in (key, "...") for step, key in zip(steps, keys, strict=False)):
            return name
    return None


def _invalid(message: str, overrides: list[Override], steps: tuple[str, ...] | None = None) -> ConfigError:
    """A schema error, naming the environment variable when one set the value."""
    variable = _set_by(_steps(message) if steps is None else steps, overrides)
    if variable is None:
        return ConfigError(f"config: {message}")
    return _Sourced(f"config: {variable}: {message}")


def _check_prices(prices: dict[Any, Any], overrides: list[Override], source: Path | None = None) -> None:
    """Each entry as a :class:`Price`, failing at ``$.pricing.<model>`` (and in the pricing
    file ``source``): msgspec names a mapping's entry ``$.pricing[...]``, leaving out which
    model, and the whole config's error could not say the entry came from another file.
    An entry of the wrong shape is reported here; a ``pricing`` that is not a mapping is
    left to the schema."""
    for model, price in prices.items():
        try:
            msgspec.convert(price, Price, strict=False)
        except msgspec.ValidationError as exc:
            message = _under(exc, f"$.pricing.{model}")
            if source is not None:
                raise _Sourced(f"config: {source}: {message}") from exc
            raise _invalid(message, overrides, ("pricing", str(model), *_steps(str(exc)))) from exc


def _read_pricing_file(path: Path) -> dict[Any, Any]:
    prices = _read_yaml(path)
    prices = prices.get("pricing", prices) if isinstance(prices, dict) else None
    if not isinstance(prices, dict):
        raise _Sourced(f"config: {path} must map model names to prices")
    _check_prices(prices, [], source=path)
    return prices


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
    overrides = _apply_env_overrides(raw, env)
    _split_deployment_options(raw)
    _inherit_sections(raw)
    own = raw.get("pricing") or {}
    if isinstance(own, dict):
        _check_prices(own, overrides)
    pricing_file = raw.get("pricing_file")
    if isinstance(pricing_file, str):
        file_prices = _read_pricing_file((base_dir or Path.cwd()) / pricing_file)
        raw["pricing"] = {**file_prices, **own} if isinstance(own, dict) else own  # else: the schema's error
    try:
        # Not strict: ${VAR} yields text, which a number or boolean field reads as the
        # number or boolean it spells; a text field keeps it as it is.
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise _invalid(str(exc), overrides) from exc
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
    _check_deployment_ids(config)


def _check_deployment_ids(config: Config) -> None:
    """An ``id`` given twice, or given as another deployment's default ``provider/model``,
    is an error: the router would rename one ``id#2``, and readiness, metrics and the
    ledger would name a deployment the config does not. Default ids may repeat (the same
    model on two servers): they are not names anyone chose."""
    defaults = {
        f"{deployment.provider}/{deployment.model}"
        for group in config.models
        for deployment in group.deployments
        if deployment.id is None
    }
    given: dict[str, str] = {}
    for i, group in enumerate(config.models):
        for j, deployment in enumerate(group.deployments):
            if deployment.id is None:
                continue
            where = f"$.models[{i}].deployments[{j}]"
            if deployment.id in given:
                raise ConfigError(
                    f"config: deployment id {deployment.id!r} is used twice (first at `{given[deployment.id]}`)"
                    f" - at `{where}.id`"
                )
            if deployment.id in defaults:
                raise ConfigError(
                    f"config: deployment id {deployment.id!r} is another deployment's default id"
                    f" (its provider/model) - at `{where}.id`"
                )
            given[deployment.id] = where


def check_options(options_type: type[msgspec.Struct], options: Mapping[str, Any], path: str) -> None:
    """Check provider options given on their own (a ``providers:`` entry, which each
    deployment completes): every key one of ``options_type``'s fields, every value of its
    field's type and within its bounds; a required field may be missing. Converted as a
    deployment's options are (not strict).

    Raises:
        ConfigError: naming the key's path under ``path`` (``$.providers.ollama.host``).
    """
    fields = {field.encode_name: field for field in msgspec.structs.fields(options_type)}
    for key, value in options.items():
        field = fields.get(key)
        if field is None:
            raise ConfigError(f"config: Object contains unknown field `{key}` - at `{path}`")
        try:
            msgspec.convert(value, field.type, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"config: {_under(exc, f'{path}.{key}')}") from exc


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load the config file at ``path`` (or only defaults + environment when None). Its
    errors name the file, unless they name where the bad value came from instead."""
    if path is None:
        return parse_config({}, env)
    path = Path(path)
    try:
        return parse_config(_read_yaml(path), env, base_dir=path.parent)
    except _Sourced:
        raise
    except ConfigError as exc:
        message = exc.message.removeprefix("config: ")
        raise ConfigError(f"config: {path}: {message}") from exc
