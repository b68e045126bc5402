"""The running batch's tensors: a left-padded KV cache and its attention mask.

Rows join and leave between decoding steps. A joining group is prefilled on its
own (left-padded among itself) and its cache is concatenated to the running one
after left-padding both to the same length; a leaving row is dropped with
``index_select`` and columns that became padding for every remaining row are cut
off the left. Padding never changes a row's result: its keys are masked out and
each row's position ids count only its real tokens (models with absolute position
embeddings such as GPT-2 depend on that).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BatchState", "cache_supports_batching", "prefill_inputs"]


def cache_supports_batching(cache: Any) -> bool:
    """True when every layer of ``cache`` is a plain growing layer we can pad and slice.

    Sliding-window, static and quantized layers keep extra bookkeeping; models
    using them run one request at a time.
    """
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


def _left_pad(tensor: Any, amount: int, dim: int) -> Any:
    import torch.nn.functional as F

    if amount == 0:
        return tensor
    # F.pad lists (left, right) pairs starting from the last dimension.
    pads = [0, 0] * (tensor.dim() - 1 - (dim % tensor.dim())) + [amount, 0]
    return F.pad(tensor, pads)


class BatchState:
    """KV cache, attention mask and per-row positions of the rows being decoded."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.mask: Any = None
        """``[rows, cache_length]`` of 0/1: which cache columns hold real tokens."""
        self.positions: list[int] = []
        """Per row, the position id of the token it feeds next (= its real length)."""

    @property
    def size(self) -> int:
        return len(self.positions)

    def clear(self) -> None:
        self.cache = self.mask = None
        self.positions = []

    def join(self, cache: Any, mask: Any, positions: list[int]) -> None:
        """Append the rows of a freshly prefilled group (its own cache and mask)."""
        import torch

        if self.cache is None:
            self.cache, self.mask, self.positions = cache, mask, list(positions)
            return
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        length = max(old_len, new_len)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat(
                [_left_pad(mine.keys, length - old_len, -2), _left_pad(theirs.keys, length - new_len, -2)]
            )
            mine.values = torch.cat(
                [_left_pad(mine.values, length - old_len, -2), _left_pad(theirs.values, length - new_len, -2)]
            )
        self.mask = torch.cat(
            [_left_pad(self.mask, length - old_len, 1), _left_pad(mask, length - new_len, 1)]
        )
        self.positions.extend(positions)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then drop all-padding columns on the left."""
        import torch

        if len(rows) == self.size:
            return
        if not rows:
            self.clear()
            return
        index = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask.index_select(0, index)
        self.positions = [self.positions[row] for row in rows]
        used = self.mask.any(dim=0)
        first = int(torch.argmax(used.to(torch.int8)))
        if first > 0:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first:, :]
                layer.values = layer.values[:, :, first:, :]
            self.mask = self.mask[:, first:]

    def decode_inputs(self, next_tokens: list[int]) -> dict[str, Any]:
        """Model inputs for one decoding step (one new token per row); grows the mask.

        The cache is not among them: the engine passes it under the name its model takes.
        """
        import torch

        device = self.mask.device
        ones = torch.ones((self.size, 1), dtype=self.mask.dtype, device=device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        inputs = {
            "input_ids": torch.tensor(next_tokens, device=device).unsqueeze(1),
            "attention_mask": self.mask,
            "position_ids": torch.tensor(self.positions, device=device).unsqueeze(1),
            "use_cache": True,
        }
        self.positions = [p + 1 for p in self.positions]
        return inputs


def prefill_inputs(prompts: list[list[int]], pad_token_id: int, device: Any) -> dict[str, Any]:
    """Left-padded model inputs for a group of prompts, with position ids from the mask."""
    import torch

    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, length - len(prompt) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
        "use_cache": True,
    }
