"""A continuous-batching decode model for the mock server (what vLLM-like servers do).

At most ``capacity`` sequences decode at once; the others wait in a FIFO queue. While ``b``
sequences decode, each advances one token every ``t0 * (1 + b / knee)`` seconds, so more
sequences give more tokens per second up to ``capacity`` (``capacity / (t0 * (1 + capacity /
knee))`` at most) and past it only longer queues. The engine ticks every ``TICK_SECONDS`` while it
has work. ``set_capacity`` changes the capacity while it runs (a smaller one lets the running
sequences finish, and admits no more until fewer run).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass

TICK_SECONDS = 0.005


@dataclass
class _Sequence:
    tokens_left: float
    done: asyncio.Future
    queued_at: float
    started_at: float = 0.0


class DecodeEngine:
    """Runs on the mock server's event loop; ``await engine.decode(tokens)`` returns the seconds
    the sequence waited in the queue."""

    def __init__(self, capacity: int, t0: float, knee: float | None = None):
        self.capacity = capacity
        self.t0 = t0
        self.knee = float(knee or capacity)
        self._knee_is_capacity = knee is None
        self.queue: collections.deque[_Sequence] = collections.deque()
        self.running: list[_Sequence] = []
        self.total_queue_wait = 0.0
        self.total_service = 0.0   # seconds from admission to the last token, finished ones
        self.busy_seconds = 0.0    # integral of the sequences decoding over time
        self.admitted = 0
        self.decoded_tokens = 0.0
        self._wake = asyncio.Event()
        self._task = asyncio.ensure_future(self._loop())

    def set_capacity(self, capacity: int) -> None:
        """A new capacity (with the default knee, the knee moves with it: a smaller server)."""
        self.capacity = capacity
        if self._knee_is_capacity:
            self.knee = float(capacity)

    def seconds_per_token(self, batch: int) -> float:
        return self.t0 * (1 + batch / self.knee)

    def max_tokens_per_second(self) -> float:
        """Token throughput with ``capacity`` sequences decoding."""
        return self.capacity / self.seconds_per_token(self.capacity)

    async def decode(self, tokens: int) -> float:
        sequence = _Sequence(float(max(1, tokens)), asyncio.get_running_loop().create_future(),
                             time.monotonic())
        self.queue.append(sequence)
        self._wake.set()
        try:
            return await sequence.done
        finally:  # a client that gave up frees its place
            if not sequence.done.done():
                if sequence in self.running:
                    self.running.remove(sequence)
                else:
                    self.queue.remove(sequence)

    def _admit(self, now: float) -> None:
        while self.queue and len(self.running) < self.capacity:
            sequence = self.queue.popleft()
            sequence.started_at = now
            self.total_queue_wait += now - sequence.queued_at
            self.admitted += 1
            self.running.append(sequence)

    async def _loop(self) -> None:
        last = time.monotonic()
        while True:
            if not self.running and not self.queue:
                self._wake.clear()
                await self._wake.wait()
                last = time.monotonic()
            now = time.monotonic()
            self._admit(now)
            if self.running:
                self.busy_seconds += len(self.running) * (now - last)
                step = (now - last) / self.seconds_per_token(len(self.running))
                finished = []
                for sequence in self.running:
                    advanced = min(step, sequence.tokens_left)
                    sequence.tokens_left -= advanced
                    self.decoded_tokens += advanced
                    if sequence.tokens_left <= 1e-9:
                        finished.append(sequence)
                for sequence in finished:
                    self.total_service += now - sequence.started_at
                    self.running.remove(sequence)
                    sequence.done.set_result(sequence.started_at - sequence.queued_at)
                self._admit(now)
            last = now
            await asyncio.sleep(TICK_SECONDS)

    def close(self) -> None:
        self._task.cancel()
