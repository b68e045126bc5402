import copy
import pickle

import pytest

from llmrouter import errors


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [
        (400, errors.InvalidRequestError, False),
        (401, errors.AuthenticationError, False),
        (402, errors.InsufficientCreditsError, False),
        (403, errors.PermissionDeniedError, False),
        (404, errors.NotFoundError, False),
        (405, errors.UpstreamError, False),
        (408, errors.UpstreamTimeoutError, True),
        (409, errors.UpstreamError, False),
        (410, errors.UpstreamError, False),
        (413, errors.RequestTooLargeError, False),
        (418, errors.UpstreamError, False),
        (422, errors.UnprocessableEntityError, False),
        (429, errors.RateLimitError, True),
        (451, errors.UpstreamError, False),
        (500, errors.UpstreamError, True),
        (502, errors.UpstreamError, True),
        (503, errors.UpstreamUnavailableError, True),
        (504, errors.UpstreamTimeoutError, True),
    ],
)
def test_error_for_status(status, kind, retryable):
    error = errors.error_for_status(status, "boom", provider="remote", retry_after=3)
    assert type(error) is kind
    assert error.retryable is retryable
    assert error.provider == "remote"
    assert error.headers() == {"Retry-After": "3"}


def test_body_shape_and_context_window_code():
    error = errors.error_for_status(400, "too long", code="context_length_exceeded", param="messages")
    assert isinstance(error, errors.ContextWindowExceededError)
    assert error.to_body() == {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "code": "context_length_exceeded",
            "param": "messages",
        }
    }


def test_a_remote_nodes_refusal_keeps_its_kind():
    # A remote llmrouter node lacking a feature says so with this code; the request can
    # then move on to a deployment that has it instead of failing as the client's fault.
    error = errors.error_for_status(400, "`n` > 1 is not supported", code="unsupported_feature", param="n")
    assert isinstance(error, errors.UnsupportedFeatureError)
    assert error.to_body()["error"]["code"] == "unsupported_feature"
    assert type(errors.error_for_status(400, "bad", code="invalid_value")) is errors.InvalidRequestError


@pytest.mark.parametrize(
    "message",
    [
        # vLLM's OpenAI server (code 400, no context_length_exceeded)
        "'max_tokens' or 'max_completion_tokens' is too large: 8000. This model's maximum context "
        "length is 4096 tokens and your request has 2778 input tokens (8000 > 4096 - 2778).",
        # llama.cpp's server
        "request (4476 tokens) exceeds the available context size (4096 tokens)",
        # Anthropic's and Google's, as OpenRouter passes them on (metadata.raw appended)
        'Provider returned error: {"type":"error","error":{"type":"invalid_request_error",'
        '"message":"prompt is too long: 208415 tokens > 200000 maximum"}}',
        'Provider returned error: {"error":{"code":400,"message":"The input token count (1200000) '
        'exceeds the maximum number of tokens allowed (1048576).","status":"INVALID_ARGUMENT"}}',
        "input length and `max_tokens` exceed context limit: 178959 + 64000 > 200000, decrease "
        "input length or `max_tokens` and try again",
        "The input token count exceeds the maximum number of tokens allowed (1048576).",
        "Unable to submit request because the input token count is 1251952 but model only "
        "supports up to 1048576. Reduce the input token count and try again.",
    ],
)
def test_a_context_window_said_only_in_words_is_still_one(message):
    # As a plain 400 it was the request's fault everywhere: no move to a deployment with
    # a larger context.
    error = errors.error_for_status(400, message, code="400")
    assert isinstance(error, errors.ContextWindowExceededError)
    assert error.to_body()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    "message",
    [
        "max_tokens: 300000 > 64000, which is the maximum allowed number of output tokens for "
        "claude-sonnet-4-20250514",
        "max_tokens is too large: 100000. This model supports at most 16384 completion tokens, "
        "whereas you provided 100000.",
    ],
)
def test_an_output_limit_asked_too_high_stays_the_requests_fault(message):
    # No deployment of the same model takes it: the client must lower max_tokens.
    assert type(errors.error_for_status(400, message)) is errors.InvalidRequestError


def test_local_rate_limit_is_not_retryable_but_upstream_is():
    assert errors.RateLimitError("slow down").retryable is False
    assert errors.error_for_status(429, "slow down").retryable is True
    assert errors.BudgetExceededError("no money").http_status == 429


@pytest.mark.parametrize("status", [405, 409, 410, 418, 451])
def test_an_upstream_4xx_not_known_as_the_requests_fault_is_the_deployments(status):
    # As InvalidRequestError(status) it was returned at once: no failover to a healthy
    # deployment, no failure counted against this one.
    error = errors.error_for_status(status, "Method Not Allowed", code="method_not_allowed")
    assert error.http_status == 502 and not error.retryable
    assert error.message == f"Method Not Allowed (upstream HTTP {status})"
    assert error.code == "method_not_allowed"
    said = errors.error_for_status(status, f"upstream answered HTTP {status}: Not Allowed")
    assert said.message == f"upstream answered HTTP {status}: Not Allowed", "the status is not named twice"


def _exported_errors() -> list[type[BaseException]]:
    exported = (getattr(errors, name) for name in errors.__all__)
    return [kind for kind in exported if isinstance(kind, type) and issubclass(kind, BaseException)]


def _same(copied: errors.LLMRouterError, original: errors.LLMRouterError) -> bool:
    return type(copied) is type(original) and copied.args == original.args and vars(copied) == vars(original)


@pytest.mark.parametrize("kind", _exported_errors(), ids=lambda kind: kind.__name__)
def test_every_error_survives_pickle_and_copy(kind):
    # Errors cross process boundaries (worker pools, multiprocessing) and get copied; a
    # class whose __init__ did not take its own args could do neither.
    error = kind("boom")
    error.provider, error.retry_after, error.param = "remote", 2.0, "messages"
    assert _same(pickle.loads(pickle.dumps(error)), error)
    assert _same(copy.copy(error), error)
    assert _same(copy.deepcopy(error), error)


@pytest.mark.parametrize("kind", [errors.NestedTooDeeplyError, errors.ShuttingDownError])
def test_errors_built_without_arguments_survive_pickle_and_copy(kind):
    error = kind()
    assert _same(pickle.loads(pickle.dumps(error)), error)
    assert _same(copy.copy(error), error)
