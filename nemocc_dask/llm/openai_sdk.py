"""Drive an ``openai.AsyncOpenAI`` (or ``AsyncAzureOpenAI``) client the user already has: their
auth (Azure AD tokens, custom headers, organisation) with this package's window, retries,
journal and report. The SDK's own retries are turned off so that ours are the only ones, and
``LLMConfig.timeout`` applies.

Give ``LLMConfig(client_factory=make_my_client)``: a picklable zero-argument callable that
returns the SDK client, called once on each worker (SDK clients cannot travel between processes).
"""

from __future__ import annotations

import json

from nemocc_dask.llm.client import Completion, RetryableError, error_for_status, parse_completion

SDK_FIELDS = frozenset({"temperature", "top_p", "max_tokens", "seed", "stop", "n"})


def is_openai_sdk_client(client) -> bool:
    """Whether ``client`` looks like an openai SDK client (``client.chat.completions.create``)."""
    return not hasattr(client, "complete") and hasattr(getattr(client, "chat", None), "completions")


class OpenAISDKClient:
    """The pool's client protocol over an openai SDK async client."""

    def __init__(self, sdk_client, timeout: float, all_choices: bool = False):
        self._client = sdk_client.with_options(max_retries=0, timeout=timeout)
        self._all_choices = all_choices

    async def complete(self, messages: list[dict], settings: dict) -> Completion:
        import openai

        body = dict(settings)
        model = body.pop("model", None)
        known = {k: body.pop(k) for k in list(body) if k in SDK_FIELDS}
        try:
            answer = await self._client.chat.completions.create(
                model=model, messages=messages, extra_body=body or None, **known)
        except openai.APITimeoutError as exc:
            raise RetryableError("timeout", f"no answer in time: {exc}") from None
        except openai.APIConnectionError as exc:
            raise RetryableError("connection", f"{type(exc).__name__}: {exc}",
                                 connection=True) from None
        except openai.APIStatusError as exc:
            body_bytes = json.dumps(exc.body if exc.body is not None else {}).encode()
            if isinstance(exc.body, dict) and "error" not in exc.body:
                body_bytes = json.dumps({"error": exc.body}).encode()
            raise error_for_status(exc.status_code, body_bytes,
                                   exc.response.headers.get("retry-after")) from None
        return parse_completion(answer.model_dump(), self._all_choices)

    async def aclose(self) -> None:
        await self._client.close()
