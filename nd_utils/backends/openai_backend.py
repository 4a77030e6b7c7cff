"""Chat-completion backend for Describe-and-Dissect that calls an OpenAI-compatible API.

The key comes from an environment variable and is never put into repr(), error messages or
logs. The SDK's own retries are switched off so that back-off is done here, with an injectable
``sleep`` that tests can record instead of waiting.

Example:
    >>> llm = OpenAIChat("gpt-3.5-turbo")            # needs: export OPENAI_API_KEY=sk-...
    >>> llm.model_id
    'openai:gpt-3.5-turbo'
    >>> llm.complete("Summarise: stripes, zebra, fur", temperature=0.0, seed=0)
    'zebra stripes'
"""
from __future__ import annotations

import email.utils
import logging
import os
import time
from typing import Any, Callable

import openai

from ..errors import ConfigError, NdUtilsError

log = logging.getLogger(__name__)

# 408/409 are transient on OpenAI (request timeout, lock contention); the SDK retries them too.
_RETRY_STATUSES = frozenset({408, 409, 429})
_REDACTED = "[redacted]"


class MissingApiKeyError(ConfigError):
    """The environment variable that should hold the API key is unset or empty."""


def _retry_after(headers: Any) -> float | None:
    """Return the server's requested wait in seconds, or None if it gave none we can parse."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")  # OpenAI sends this non-standard, finer-grained variant
    if ms is not None:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:  # RFC 9110 also allows an HTTP-date
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - time.time()


class OpenAIChat:
    """Complete single-message prompts with an OpenAI chat model, retrying transient failures."""

    name = "openai"
    chat = True  # the answer cache passes templates as chat messages

    def __init__(
        self,
        model: str = "gpt-3.5-turbo",
        *,
        api_key_env: str = "OPENAI_API_KEY",
        base_url: str | None = None,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        timeout: float = 60.0,
        max_tokens: int = 64,
        sleep: Callable[[float], Any] = time.sleep,
        require_key: bool = True,
    ) -> None:
        key = os.environ.get(api_key_env, "").strip()
        self._missing_key = None if key else (
            f"the OpenAI backend needs an API key in the environment variable {api_key_env}, "
            "which is unset or empty. Set it in the shell that starts Python or Jupyter "
            f"(export {api_key_env}=sk-...), answer from the cache with llm.mode=replay, or run "
            "offline with the `transformers` or `keywords` backend."
        )
        # Replaying answers from the cache needs the model's id, never the service: without a
        # key (require_key=False) the backend is built, and only a request would fail.
        if self._missing_key and require_key:
            raise MissingApiKeyError(self._missing_key)
        if max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {max_retries}.")
        if backoff < 0 or max_backoff < 0:
            raise ConfigError(
                f"backoff and max_backoff must be >= 0, got {backoff} and {max_backoff}."
            )
        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.timeout = float(timeout)
        self.max_tokens = int(max_tokens)
        self._sleep = sleep
        # The key lives only inside the SDK client; this object never keeps its own copy.
        # max_retries=0 because the SDK would otherwise sleep on its own clock, invisible to tests.
        self._client = None if not key else openai.OpenAI(
            api_key=key, base_url=self.base_url, max_retries=0, timeout=self.timeout
        )

    @property
    def model_id(self) -> str:
        """Identifier for cache keys: backend and model, never anything secret."""
        return f"{self.name}:{self.model}"

    def __repr__(self) -> str:
        return (
            f"OpenAIChat(model={self.model!r}, base_url={self.base_url!r}, "
            f"max_retries={self.max_retries}, max_tokens={self.max_tokens})"
        )

    def complete(self, prompt: str, *, temperature: float, seed: int,
                 messages: "list[dict] | None" = None) -> str:
        """Send `messages` (default: `prompt` as one user message); return the reply text."""
        if self._client is None:
            raise MissingApiKeyError(self._missing_key)
        messages = messages or [{"role": "user", "content": prompt}]
        attempts = self.max_retries + 1
        last = "no response"
        for attempt in range(attempts):
            outcome, value, retry_after = self._attempt(messages, temperature, seed)
            if outcome == "ok":
                return value
            if outcome == "fatal":
                # Raised outside any except block, so no SDK exception (whose request object
                # carries the Authorization header) is chained onto it.
                raise NdUtilsError(value)
            last = value
            if attempt + 1 < attempts:
                delay = self._delay(attempt, retry_after)
                log.warning(
                    "OpenAI %s: %s; retrying in %.2fs (attempt %d of %d)",
                    self.model, last, delay, attempt + 1, attempts,
                )
                self._sleep(delay)
        raise NdUtilsError(
            f"OpenAI request to model {self.model!r} failed after {attempts} attempt(s) "
            f"(max_retries={self.max_retries}); last error: {last}. The service may be "
            "overloaded or unreachable: retry later, raise max_retries, or use an offline backend."
        )

    def _attempt(self, messages: list[dict], temperature: float, seed: int
                 ) -> tuple[str, str, float | None]:
        """Make one request: ("ok", text, None), ("retry", why, wait) or ("fatal", msg, None)."""
        try:
            response = self._client.chat.completions.create(
                model=self.model,
                messages=messages,
                temperature=temperature,
                seed=seed,
                max_tokens=self.max_tokens,
            )
        except openai.APIStatusError as exc:
            status = exc.status_code
            detail = self._scrub(self._server_message(exc))
            if status in _RETRY_STATUSES or status >= 500:
                return "retry", f"HTTP {status} ({detail})", _retry_after(exc.response.headers)
            return "fatal", (
                f"OpenAI request to model {self.model!r} failed with HTTP {status}: {detail}"
            ), None
        except openai.APIConnectionError as exc:  # APITimeoutError is a subclass
            return "retry", f"{type(exc).__name__} ({self._scrub(str(exc))})", None
        choices = getattr(response, "choices", None)
        if not choices:
            return "fatal", (
                f"OpenAI model {self.model!r} returned no choices: "
                f"{self._scrub(repr(response)[:300])}"
            ), None
        return "ok", choices[0].message.content or "", None

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry `attempt` + 1: the server's hint, else exponential."""
        if retry_after is not None:
            # Capped so a buggy or hostile Retry-After cannot stall a long pipeline run.
            return min(max(retry_after, 0.0), self.max_backoff)
        return min(self.backoff * 2**attempt, self.max_backoff)

    @staticmethod
    def _server_message(exc: openai.APIStatusError) -> str:
        """The human-readable message the server put in its error body, if any."""
        body = exc.body
        if isinstance(body, dict):
            inner = body.get("error", body)
            if isinstance(inner, dict) and inner.get("message"):
                return str(inner["message"])
            if isinstance(inner, str) and inner:
                return inner
        return str(exc.message)

    def _scrub(self, text: str) -> str:
        """Replace the API key in `text`: servers sometimes echo a rejected key back."""
        key = self._client.api_key if self._client is not None else None
        return text.replace(key, _REDACTED) if key else text
