"""Tiny Hugging Face models built offline, for tests of local providers.

Each builder trains a small byte-level BPE tokenizer on a fixed corpus, wraps it in
a ``PreTrainedTokenizerFast`` with a ChatML-style chat template, creates a causal LM
with random weights from a config and ``save_pretrained``\\ s both into ``path``.
Everything is deterministic (fixed corpus, fixed seed), takes a few seconds, and
needs no network. The text such a model writes is gibberish, but every code path a
provider has (chat templates, streaming, stop strings, batching, usage, cancellation)
is exercised for real.

``transformers``, ``tokenizers`` and ``torch`` are imported inside the functions:
``import llmrouter`` (and this module) must not pull them in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CHATML_TEMPLATE", "SPECIAL_TOKENS", "build_tiny_gpt2", "build_tiny_llama", "build_tokenizer"]

#: ChatML, the template SmolLM2 and Qwen use; ``content`` must be a string.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]

# Mixed scripts so the BPE learns merges across multi-byte UTF-8 sequences too.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "user assistant system: answer briefly and politely.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024.",
    "Streaming tokens one by one, stop strings, batching and cancellation.",
    "Café, naïve, façade, jalapeño, Größe, smørrebrød.",
    "日本語のテキスト、中文文本，한국어 텍스트.",  # noqa: RUF001 - full-width punctuation on purpose
    "Emoji: 😀 🚀 🎉 👍 ❤️ 🌍 — done.",
    "def add(a, b):\n    return a + b\n",
    '{"key": "value", "list": [1, 2, 3]}',
]


def build_tokenizer(vocab_size: int = 512, *, chat_template: str | None = CHATML_TEMPLATE) -> Any:
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        vocab_size: target vocabulary size, special tokens included.
        chat_template: Jinja chat template stored with the tokenizer; ``None`` leaves
            the tokenizer without one (to test the "no chat template" error).

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``<s>``, ``</s>``, ``<unk>``,
        ``<pad>`` and the ChatML markers as special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so pair counts are large enough to learn a full vocabulary.
    tokenizer.train_from_iterator(_CORPUS * 8, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped


def _save(model: Any, tokenizer: Any, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    # Like real ChatML models, the end of an assistant turn also ends generation.
    model.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    ]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_llama(
    path: str | Path,
    *,
    hidden_size: int = 64,
    num_heads: int = 2,
    num_layers: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    initializer_range: float = 0.2,
    chat_template: str | None = CHATML_TEMPLATE,
    seed: int = 0,
) -> Path:
    """Build a tiny random-weight Llama and its tokenizer into ``path``.

    The defaults give ``head_dim = 32``, the smallest head size vLLM's CPU attention
    kernel accepts. ``initializer_range`` is larger than Llama's 0.02 so the logits
    are peaked: greedy decoding then does not hinge on float rounding, and batched
    and solo runs pick the same tokens.

    Args:
        path: directory to write (created if missing).
        hidden_size: model width.
        num_heads: attention heads (also key/value heads).
        num_layers: decoder layers.
        intermediate_size: MLP width.
        vocab_size: tokenizer vocabulary size target.
        max_position_embeddings: longest sequence the model accepts.
        initializer_range: standard deviation of the random weights.
        chat_template: chat template saved with the tokenizer, or ``None`` for none.
        seed: torch seed for the weights.

    Returns:
        ``path`` as a :class:`~pathlib.Path`, loadable with ``AutoModelForCausalLM``
        and ``AutoTokenizer``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(vocab_size, chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return _save(model.eval(), tokenizer, Path(path))


def build_tiny_gpt2(
    path: str | Path,
    *,
    hidden_size: int = 64,
    num_heads: int = 2,
    num_layers: int = 2,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    initializer_range: float = 0.2,
    chat_template: str | None = CHATML_TEMPLATE,
    seed: int = 0,
) -> Path:
    """Build a tiny random-weight GPT-2 (learned absolute positions) into ``path``.

    GPT-2 exercises what Llama's rotary embeddings hide: with left padding the
    position ids must be computed from the attention mask, or batched output drifts
    from solo output.

    Args:
        path: directory to write (created if missing).
        hidden_size: model width (``n_embd``).
        num_heads: attention heads.
        num_layers: transformer blocks.
        vocab_size: tokenizer vocabulary size target.
        max_position_embeddings: longest sequence (``n_positions``).
        initializer_range: standard deviation of the random weights.
        chat_template: chat template saved with the tokenizer, or ``None`` for none.
        seed: torch seed for the weights.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer(vocab_size, chat_template=chat_template)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=hidden_size,
        n_head=num_heads,
        n_layer=num_layers,
        n_positions=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return _save(model.eval(), tokenizer, Path(path))
