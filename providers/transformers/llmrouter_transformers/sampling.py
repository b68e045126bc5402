"""Choosing the next token for each request of a batch, with the request's own settings.

Each request keeps its own ``torch.Generator``: a seeded request draws the same
tokens whatever else shares its batch, and requests never disturb each other's (or
the process's) random state. OpenAI semantics: ``temperature`` 0 is greedy;
``top_p`` keeps the smallest set of tokens whose probability reaches ``top_p``;
``presence_penalty`` / ``frequency_penalty`` lower the logits of tokens already
generated; ``logit_bias`` adds to a token's logit.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SamplingParams", "TokenSampler", "choose_next_tokens"]

_GREEDY_BELOW = 1e-5


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    """How one request generates."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_BELOW

    @property
    def plain(self) -> bool:
        """No penalties or biases: the logits are used as the model gave them."""
        return not (self.presence_penalty or self.frequency_penalty or self.logit_bias)


class TokenSampler:
    """The per-request state of sampling: its generator and token counts.

    Args:
        params: the request's settings.
        device: where the logits live (the generator must be on the same device).
    """

    def __init__(self, params: SamplingParams, device: Any) -> None:
        import torch

        self.params = params
        self._counts: dict[int, int] = {}
        self._generator: Any = None
        if not params.greedy:
            self._generator = torch.Generator(device=device)
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self._generator.manual_seed(seed % (2**63))

    def record(self, token_id: int) -> None:
        """Remember a generated token (for the penalties)."""
        if not self.params.plain:
            self._counts[token_id] = self._counts.get(token_id, 0) + 1

    def adjust(self, logits: Any) -> Any:
        """Apply penalties and biases to one row of logits (float32, 1-D)."""
        import torch

        params = self.params
        if params.plain:
            return logits
        logits = logits.clone()
        if self._counts and (params.presence_penalty or params.frequency_penalty):
            ids = torch.tensor(list(self._counts), device=logits.device)
            counts = torch.tensor(list(self._counts.values()), device=logits.device, dtype=logits.dtype)
            logits[ids] -= params.frequency_penalty * counts + params.presence_penalty
        for token_id, bias in params.logit_bias.items():
            if 0 <= token_id < logits.shape[-1]:
                logits[token_id] += bias
        return logits

    def choose(self, logits: Any) -> int:
        """The next token from one row of logits."""
        import torch

        logits = self.adjust(logits)
        if self.params.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Keep a token while the mass before it is still below top_p; the first always
            # stays (with top_p 0 the mask would take it too: no token left to draw).
            cut = (cumulative - sorted_probs) >= self.params.top_p
            cut[0] = False
            sorted_probs[cut] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._generator))


def choose_next_tokens(logits: Any, samplers: list[TokenSampler]) -> list[int]:
    """The next token for every row of ``logits`` (shape ``[batch, vocab]``).

    Greedy rows without penalties share one batched ``argmax``; the others are
    sampled row by row with their own generator.
    """
    import torch

    logits = logits.float()
    fast = [i for i, s in enumerate(samplers) if s.params.greedy and s.params.plain]
    chosen: list[int] = [0] * len(samplers)
    if fast:
        picks = torch.argmax(logits[fast], dim=-1).tolist()
        for row, token in zip(fast, picks, strict=True):
            chosen[row] = token
    fast_rows = set(fast)
    for row, sampler in enumerate(samplers):
        if row not in fast_rows:
            chosen[row] = sampler.choose(logits[row])
    for sampler, token in zip(samplers, chosen, strict=True):
        sampler.record(token)
    return chosen
