import subprocess
import sys
from pathlib import Path

from llmrouter.tokens import count_text, encoding_name_for


def test_encoding_family_by_model_name():
    assert encoding_name_for("openai/gpt-4o-mini") == "o200k_base"
    assert encoding_name_for("o3") == "o200k_base"
    assert encoding_name_for("gpt-3.5-turbo") == "cl100k_base"
    assert encoding_name_for("llama-3") == "cl100k_base"


def test_counts_with_tiktoken_offline_from_a_fresh_cache_dir(tmp_path: Path):
    # A process of its own: encodings are loaded once per process. The BPE files come
    # from the bpe-openai package, unpacked under the names tiktoken looks for.
    code = (
        "from llmrouter.tokens import count_text\n"
        "print(count_text('hello there world', 'gpt-4o'), count_text('hello there world', 'gpt-4'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"TIKTOKEN_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == ["3", "3"]  # the 4-characters estimate would say 5
    assert len([p for p in tmp_path.iterdir() if not p.name.endswith(".tmp")]) == 2


def test_empty_text_is_no_tokens():
    assert count_text("") == 0


def test_image_parts_count_in_the_prompt():
    # Counted as nothing, an image's prompt was missing from a priced request's reservation.
    from llmrouter.tokens import count_messages
    from llmrouter.types import decode_chat_request

    def messages(*images: dict) -> list:
        parts = [{"type": "text", "text": "What is in these pictures?"}]
        parts += [{"type": "image_url", "image_url": image} for image in images]
        return decode_chat_request(
            {"model": "gpt-4o", "messages": [{"role": "user", "content": parts}]}
        ).messages

    text_only = count_messages(messages(), "gpt-4o")
    with_images = count_messages(
        messages({"url": "https://example.com/a.png"}, {"url": "https://example.com/b.png", "detail": "low"}),
        "gpt-4o",
    )
    assert with_images - text_only == 765 + 85
