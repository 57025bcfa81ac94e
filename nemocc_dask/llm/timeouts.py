"""The request timeout of ``LLMConfig(timeout="auto")``: follows what an endpoint's answers take.

Its settings are ``nemocc.request-timeout.*`` in Dask config (``nemocc.yaml``). Until
``min-answers`` answers have arrived a request may take ``ceiling-seconds``. After that its limit
is ``margin`` times the 90th percentile of the full-length latency the recent answers predict for
the request's ``max_tokens`` (an answer of ``t`` tokens that took ``L`` seconds predicts
``L * max_tokens / t`` for a full-length one: an upper bound when part of ``L`` is a fixed
overhead or queueing), kept between ``floor-seconds`` and ``ceiling-seconds``. A slow CPU
server thus gets minutes, a fast GPU server seconds, and a request stuck on a dead connection is
given up on in proportion to the server's own pace. A number instead of ``"auto"`` is a fixed
limit.
"""

from __future__ import annotations

import collections
import time

from nemocc_dask.config import setting

RECENT_ANSWERS = 200     # how many recent answers the limit is computed from
RECOMPUTE_SECONDS = 1.0  # the limit per max_tokens is recomputed at most this often
DEFAULT_MAX_TOKENS = 1024  # for requests that send no max_tokens


class AdaptiveTimeout:
    """One endpoint's automatic request timeout (see the module docstring)."""

    def __init__(self) -> None:
        self._answers: collections.deque = collections.deque(maxlen=RECENT_ANSWERS)
        self._seen = 0
        self._cache: dict[int, tuple[float, float]] = {}  # max_tokens -> (when, limit)
        self.last: float | None = None  # the latest limit applied (for the report)

    def on_answer(self, latency: float, tokens: int) -> None:
        """An answer of ``tokens`` completion tokens took ``latency`` seconds."""
        self._answers.append((latency, max(1, int(tokens or 0))))
        self._seen += 1

    def limit(self, max_tokens: int | None) -> float:
        """Seconds a request asking for up to ``max_tokens`` tokens may take now."""
        wanted = int(max_tokens or DEFAULT_MAX_TOKENS)
        if self._seen < setting("request-timeout.min-answers"):
            value = setting("request-timeout.ceiling-seconds")
        else:
            now = time.monotonic()
            when, value = self._cache.get(wanted, (0.0, 0.0))
            if now - when >= RECOMPUTE_SECONDS:
                value = self._compute(wanted)
                self._cache[wanted] = (now, value)
        self.last = value
        return value

    def _compute(self, max_tokens: int) -> float:
        predicted = sorted(latency * max(1.0, max_tokens / tokens)
                           for latency, tokens in self._answers)
        p90 = predicted[min(len(predicted) - 1, int(0.9 * len(predicted)))]
        return min(setting("request-timeout.ceiling-seconds"),
                   max(setting("request-timeout.floor-seconds"),
                       setting("request-timeout.margin") * p90))
