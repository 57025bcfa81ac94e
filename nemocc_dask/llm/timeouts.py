"""The request timeout of ``LLMConfig(timeout="auto")``: follows what an endpoint's answers take.

Until ``MIN_ANSWERS`` answers have arrived a request may take ``CEILING_SECONDS``. After that its
limit is ``MARGIN`` times the 90th percentile of the full-length latency the recent answers
predict for the request's ``max_tokens`` (an answer of ``t`` tokens that took ``L`` seconds
predicts ``L * max_tokens / t`` for a full-length one: an upper bound when part of ``L`` is a
fixed overhead or queueing), kept between ``FLOOR_SECONDS`` and ``CEILING_SECONDS``. A slow CPU
server thus gets minutes, a fast GPU server seconds, and a request stuck on a dead connection is
given up on in proportion to the server's own pace. A number instead of ``"auto"`` is a fixed
limit.
"""

from __future__ import annotations

import collections
import time

MIN_ANSWERS = 20         # answers seen before the limit follows them
RECENT_ANSWERS = 200     # how many recent answers the limit is computed from
MARGIN = 3.0             # times the predicted full-length latency
FLOOR_SECONDS = 30.0     # never below this
CEILING_SECONDS = 1800.0  # never above this (and the limit until MIN_ANSWERS answers)
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
        if self._seen < MIN_ANSWERS:
            value = CEILING_SECONDS
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
        return min(CEILING_SECONDS, max(FLOOR_SECONDS, MARGIN * p90))
