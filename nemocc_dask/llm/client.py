"""The client protocol the per-worker pool drives, and its OpenAI-compatible HTTP implementation.

A client has either ``async def complete(messages, settings) -> Completion`` or a synchronous
``def complete_sync(messages, settings) -> Completion`` (run in a thread pool). It signals failures
by raising :class:`RetryableError` (the pool backs off and retries) or any other exception (the row
fails at once with the message). Clients are built on the workers by a picklable factory and are
never pickled themselves. An optional ``async def aclose()`` releases connections.

The HTTP client posts straight to ``/chat/completions`` over one aiohttp session with warm
keep-alive connections: about 1 ms of client CPU per request, where the openai SDK's default httpx
transport costs tens of milliseconds at high concurrency.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
OVERLOAD_STATUS = frozenset({429, 503})


@dataclass
class Completion:
    """One answer: the text of the first choice (or all choices), why it stopped, token usage."""

    text: str | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    choices: list[str] = field(default_factory=list)


class LLMRequestError(Exception):
    """A request failed; ``error_class`` is a short label (``http_400``, ``timeout``, ...)."""

    def __init__(self, error_class: str, message: str):
        super().__init__(f"{error_class}: {message}")
        self.error_class = error_class


class RetryableError(LLMRequestError):
    """A failure worth retrying. ``overload`` shrinks the window; ``connection`` counts toward
    taking the endpoint out for a cool-down; ``retry_after`` is the server's hint in seconds."""

    def __init__(self, error_class: str, message: str, retry_after: float | None = None,
                 overload: bool = False, connection: bool = False):
        super().__init__(error_class, message)
        self.retry_after = retry_after
        self.overload = overload
        self.connection = connection


@runtime_checkable
class AsyncLLMClient(Protocol):
    async def complete(self, messages: list[dict], settings: dict) -> Completion: ...


@runtime_checkable
class SyncLLMClient(Protocol):
    def complete_sync(self, messages: list[dict], settings: dict) -> Completion: ...


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header given in seconds (HTTP dates are ignored)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def error_for_status(status: int, body: bytes, retry_after: str | None) -> LLMRequestError:
    """The exception for a non-200 answer, by status code (never by message text)."""
    try:
        detail = json.loads(body)["error"]["message"]
    except Exception:
        detail = body[:200].decode("utf-8", "replace")
    if status in RETRYABLE_STATUS or status >= 500:
        return RetryableError(f"http_{status}", detail, parse_retry_after(retry_after),
                              overload=status in OVERLOAD_STATUS)
    return LLMRequestError(f"http_{status}", detail)


def _content_text(content):
    """A message's text: a string as it is, a list of content parts (``{"type": "text", "text":
    ...}``, as some APIs send) joined, ``None`` for no content; anything else is not text."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = [p.get("text") for p in content if p.get("type") == "text"]
        if texts and all(isinstance(t, str) for t in texts):
            return "".join(texts)
        raise LLMRequestError("bad_response", "the answer's message.content is a list "
                              "without text parts")
    raise LLMRequestError("bad_response", "the answer's message.content is a "
                          f"{type(content).__name__}, not text")


def _token_count(value) -> int:
    """A usage figure, or 0 where the server sent none or nonsense (a string, a negative, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return int(value) if value == value and 0 <= value < 1 << 40 else 0


def parse_completion(data: dict, all_choices: bool = False) -> Completion:
    """A Completion from a chat-completions JSON answer (first choice unless ``all_choices``).
    An answer without choices, or whose content is not text, is a failed request
    (``empty_response``/``bad_response``, which ``--retry-failed`` sends again), never kept as an
    answer; a malformed ``finish_reason`` or ``usage`` reads as absent."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices, list):
        raise LLMRequestError("empty_response", "the answer has no choices")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    messages = [c.get("message") if isinstance(c, dict) else None for c in choices]
    contents = [m.get("content") if isinstance(m, dict) else None for m in messages]
    text = _content_text(contents[0])
    first = choices[0] if isinstance(choices[0], dict) else {}
    finish = first.get("finish_reason")
    others = []
    if all_choices:
        for content in contents:
            try:
                others.append(_content_text(content))
            except LLMRequestError:
                continue
    return Completion(text=text, finish_reason=finish if isinstance(finish, str) else None,
                      prompt_tokens=_token_count(usage.get("prompt_tokens")),
                      completion_tokens=_token_count(usage.get("completion_tokens")),
                      choices=[t for t in others if isinstance(t, str)])


BYTES_PER_TOKEN = 64     # a token's text, JSON-escaped (\uXXXX), with room to spare
ANSWER_OVERHEAD_BYTES = 1 << 20


def answer_byte_limit(settings: dict) -> int:
    """The most an answer to ``settings`` can honestly weigh: ``max_tokens`` (default 32k) of
    text in each of its ``n`` choices, JSON-escaped, plus 1 MiB of envelope."""
    tokens = int(settings.get("max_tokens") or 32768) * int(settings.get("n") or 1)
    return tokens * BYTES_PER_TOKEN + ANSWER_OVERHEAD_BYTES


async def read_at_most(resp, limit: int, url: str) -> bytes:
    """The body, refused (``response_too_large``) as soon as it passes ``limit`` bytes, so a
    hostile or broken server cannot fill the worker's memory."""
    if (resp.content_length or 0) > limit:
        raise LLMRequestError("response_too_large", f"{url}: the answer is "
                              f"{resp.content_length} bytes, more than {limit} "
                              "(max_tokens allows); raise LLMConfig.max_response_bytes if real")
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise LLMRequestError("response_too_large", f"{url}: the answer passed {limit} "
                                  "bytes (more than max_tokens allows); raise "
                                  "LLMConfig.max_response_bytes if real")
        chunks.append(chunk)
    return b"".join(chunks)


class OpenAIHTTPClient:
    """POST ``{base_url}/chat/completions`` with aiohttp; one session, keep-alive connections."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float, max_connections: int,
                 all_choices: bool = False, max_bytes: int | None = None):
        """``max_bytes``: the most an answer may weigh (default: ``answer_byte_limit``)."""
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = timeout
        self._max_connections = max_connections
        self._all_choices = all_choices
        self._max_bytes = max_bytes
        self._session = None

    def _get_session(self):
        import aiohttp

        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self._timeout))
        return self._session

    async def complete(self, messages: list[dict], settings: dict) -> Completion:
        import aiohttp

        body = json.dumps({"messages": messages, **settings})
        limit = self._max_bytes or answer_byte_limit(settings)
        try:
            async with self._get_session().post(self.url, data=body) as resp:
                raw = await read_at_most(resp, limit, self.url)
                if resp.status != 200:
                    raise error_for_status(resp.status, raw, resp.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            raise RetryableError("timeout", f"{self.url}: no answer within {self._timeout:g} s "
                                            "(raise --timeout for long answers or slow servers)"
                                 ) from None
        except aiohttp.ClientError as exc:
            raise RetryableError("connection", f"{self.url}: {type(exc).__name__}: {exc}",
                                 connection=True) from None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise RetryableError("bad_response", f"{self.url}: the answer is not JSON (it begins "
                                                 f"{raw[:80]!r})") from None
        return parse_completion(data, self._all_choices)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
