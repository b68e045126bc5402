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

from typing import TYPE_CHECKING, Any

from llmrouter.accounting.config import AccountingConfig

if TYPE_CHECKING:
    from llmrouter.accounting.facade import Accounting
    from llmrouter.accounting.hooks import AccountingHooks
    from llmrouter.accounting.keys import ApiKey, KeyStore, Principal

__all__ = ["Accounting", "AccountingConfig", "AccountingHooks", "ApiKey", "KeyStore", "Principal"]

_LAZY = {
    "Accounting": "llmrouter.accounting.facade",
    "AccountingHooks": "llmrouter.accounting.hooks",
    "ApiKey": "llmrouter.accounting.keys",
    "KeyStore": "llmrouter.accounting.keys",
    "Principal": "llmrouter.accounting.keys",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llmrouter.accounting' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
