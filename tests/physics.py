"""A time-stepped model of an inference server and of the cluster that feeds it, for testing a
window controller against several kinds of server physics without a clock or HTTP.

Servers: ``slots`` requests are served at once, the rest wait in a FIFO queue (or, with
``overflow="429"``, are refused at once). A request's service time is ``overhead +
per_token * tokens * slowdown(b)`` times a log-normal noise factor, where ``slowdown(b)`` is
``1 + b / knee`` for a continuous-batching server (``knee``) and 1 otherwise. The cluster sends
at most the controller's window, learns the window and the epoch tag once per ``report`` seconds
(as workers do from the scheduler), and reports answers, load, 429s and, with ``metrics``, the
server's running/waiting gauges.
"""

from __future__ import annotations

import collections
import math
import random
from dataclasses import dataclass

from nemocc_dask.llm.concurrency import Tally


@dataclass
class Server:
    slots: int
    overhead: float = 0.0
    per_token: float = 0.0
    knee: float | None = None      # continuous batching: each token slows with the batch
    sigma: float = 0.0             # log-normal noise on every service time
    overflow: str = "queue"        # or "429"

    def work(self, tokens: int, rng: random.Random) -> float:
        """Seconds of service at batch size 1 (before the batching slowdown and noise)."""
        noise = math.exp(rng.gauss(0.0, self.sigma)) if self.sigma else 1.0
        return (self.overhead + self.per_token * tokens) * noise

    def slowdown(self, batch: int) -> float:
        return 1.0 + batch / self.knee if self.knee else 1.0


@dataclass
class Outcome:
    occupancy: float        # mean requests in service / slots, second half of the run
    queueing: float         # mean queue wait / mean service time, second half
    t90: float | None       # first time the 2-s occupancy reached 0.9
    windows: list           # (time, window) after each change
    refused: int            # 429s


def simulate(controller, server: Server, seconds: float, tokens=lambda rng: 200,
             report: float = 0.25, metrics: bool = False, dt: float | None = None,
             events: dict | None = None, seed: int = 0) -> Outcome:
    """Run ``controller`` against ``server`` for ``seconds``; ``events`` maps a time to a new
    slot count (capacity lost or gained mid-run)."""
    rng = random.Random(seed)
    base = server.overhead + server.per_token * 200
    dt = dt or max(0.002, base / 40)
    queue: collections.deque = collections.deque()
    running: list = []  # [work left, started, sent, tag, tokens]
    window, tag, now = controller.window, controller.epoch, 0.0
    in_flight = refused = 0
    tallies: dict[int, Tally] = collections.defaultdict(Tally)
    sent: dict[int, int] = collections.defaultdict(int)
    overloads = 0
    next_report = report
    busy_samples, waits, services = [], [], []
    windows = [(0.0, window)]
    events = dict(events or {})
    while now < seconds:
        for at in [t for t in events if t <= now]:
            if server.knee == server.slots:  # a smaller batching server: its knee moves too
                server.knee = events[at]
            server.slots = events.pop(at)
        while in_flight < window:  # the workers fill the window they were granted
            in_flight += 1
            if server.overflow == "429" and len(running) + len(queue) >= server.slots:
                refused += 1
                overloads += 1
                in_flight -= 1
                break
            n = tokens(rng)
            sent[tag] += 1
            queue.append([server.work(n, rng), None, now, tag, n])
        while queue and len(running) < server.slots:
            item = queue.popleft()
            item[1] = now
            waits.append((now, now - item[2]))
            running.append(item)
        slow = server.slowdown(len(running))
        done = []
        for item in running:
            item[0] -= dt / slow
            if item[0] <= 0:
                done.append(item)
        for item in done:
            running.remove(item)
            in_flight -= 1
            services.append((now, now + dt - item[1]))
            tallies[item[3]].add(now + dt - item[2], item[4])
        busy_samples.append((now, len(running) / server.slots))
        now += dt
        if now >= next_report:
            next_report += report
            changes = []
            for t, count in sent.items():
                controller.on_sent(t, count)
            sent.clear()
            for t, tally in tallies.items():
                changes.append(controller.on_tally(t, tally))
            tallies.clear()
            controller.on_load(10 ** 9, in_flight)
            if overloads:
                changes.append(controller.on_overload(now))
                overloads = 0
            if metrics:
                changes.append(controller.on_queue(len(running), len(queue), in_flight))
            window, tag = controller.window, controller.epoch
            if any(changes):
                windows.append((round(now, 2), window))
    half = [b for t, b in busy_samples if t >= seconds / 2]
    wait = [w for t, w in waits if t >= seconds / 2]
    service = [s for t, s in services if t >= seconds / 2]
    return Outcome(occupancy=sum(half) / max(1, len(half)),
                   queueing=(sum(wait) / max(1, len(wait))) / max(1e-9, sum(service)
                                                                  / max(1, len(service))),
                   t90=_t90(busy_samples), windows=windows, refused=refused)


def _t90(samples: list) -> float | None:
    span = 2.0
    j, total = 0, 0.0
    for i, (t, b) in enumerate(samples):
        total += b
        while samples[j][0] < t - span:
            total -= samples[j][1]
            j += 1
        if t >= span and total / (i - j + 1) >= 0.9:
            return t
    return None
