"""Money and access: API keys, the usage ledger, budgets, rate limits and reports.

Usable without the service::

    from llmrouter import Router
    from llmrouter.accounting import Accounting

    async with Accounting.from_config(config) as acct:
        key, secret = await acct.keys.create(name="ci", scopes=["user"])
        async with Router(config, hooks=[acct.hooks]) as router:
            ctx = RequestContext(principal=await acct.authenticate(secret))
            await router.chat(request, context=ctx)

Importing this package is cheap: SQLAlchemy, Redis and Litestar are imported only by
the submodules that need them (``llmrouter.accounting.config`` is imported by
``llmrouter.config``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from llmrouter.accounting.config import AccountingConfig
from llmrouter.lazy import lazy_exports

if TYPE_CHECKING:
    from llmrouter.accounting.extension import AccountingExtension
    from llmrouter.accounting.facade import Accounting
    from llmrouter.accounting.hooks import AccountingHooks
    from llmrouter.accounting.keys import ApiKey, KeyStore, Principal

__all__ = [
    "Accounting",
    "AccountingConfig",
    "AccountingExtension",
    "AccountingHooks",
    "ApiKey",
    "KeyStore",
    "Principal",
    "extension_from_config",
]

_LAZY = {
    "Accounting": "llmrouter.accounting.facade",
    "AccountingExtension": "llmrouter.accounting.extension",
    "AccountingHooks": "llmrouter.accounting.hooks",
    "ApiKey": "llmrouter.accounting.keys",
    "KeyStore": "llmrouter.accounting.keys",
    "Principal": "llmrouter.accounting.keys",
}


__getattr__ = lazy_exports(__name__, _LAZY)


def extension_from_config(config: Any) -> AccountingExtension | None:
    """The service's accounting extension for a :class:`~llmrouter.config.Config`
    (None when ``accounting.enabled`` is false, or when SQLModel is not installed)."""
    section: AccountingConfig = getattr(config, "accounting", None) or AccountingConfig()
    if not section.enabled:
        return None
    try:
        from llmrouter.accounting.extension import AccountingExtension
        from llmrouter.accounting.facade import Accounting
    except ImportError as exc:
        logging.getLogger("llmrouter.accounting").warning(
            "accounting disabled: %s (install `llmrouter[accounting]`)", exc
        )
        return None
    return AccountingExtension(Accounting.from_config(config if hasattr(config, "accounting") else section))
