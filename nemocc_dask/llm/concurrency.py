"""Learned concurrency (``max_in_flight="auto"``): one window per endpoint, from merged answers.

The goal is the window at which the server's throughput stops rising: every slot of the server
busy, and no more than a short queue in front of it. The controller is pure (no I/O, no clock of
its own). It runs once per endpoint: on the Dask scheduler for the whole cluster (fed with every
worker's answers by ``budget.Coordinator``), or inside a pool that has no scheduler.

Inputs, all mergeable across workers:

* ``on_sent`` / ``on_tally`` / ``on_lost``: per epoch tag, requests sent, the sufficient
  statistics of their answers (``Tally``: count, sums of latency, answer tokens, tokens^2 and
  latency x tokens) and requests that ended without an answer. Requests carry the epoch they were
  sent in, so answers to an older window never count for the current one. An epoch measures a
  *cohort*: once enough requests were sent with its tag, the tag moves on (same window) and the
  decision waits until the cohort is back, so that the first (fastest) answers do not bias it.
* ``on_load``: the cluster's demand and requests in flight (is the window what limits us?).
* ``on_queue``: the server's own queue gauges, where it has them (vLLM, SGLang, TGI, llama.cpp).
* ``on_overload``: 429/503 answers and timeouts.

Latency signal (no queue gauges). Epochs are compared by *predicted* latency: a line
``latency = a + b * answer tokens`` is fitted to one epoch (a fixed overhead plus a decode cost
per token; either may be zero), and ``r`` = the other epoch's latency over what that line
predicts for the same answers. So a server whose service time does not depend on answer length
and one that decodes token by token are measured alike, a change of answer lengths (another task)
does not look like load, and per-answer noise averages out over the epoch's answers. The
elasticity ``e = ln r / ln(window ratio)`` is about 0 below the server's slots (fixed service),
below about 0.5 for a batching server (more sequences decode a little slower each) and 1 in a
queue (pure waiting). Phases:

* slow start: grow x4 per measured epoch while ``e < FAST_BELOW``, x2 while ``e < GROW_BELOW``;
  then, by Little's law, the
  server's capacity is about ``window / r`` (the throughput of the saturated window times the
  latency of the last window below it); settle a little above it (``SETTLE_MARGIN``).
* steady: every ``PROBE_EVERY`` epochs probe ``PROBE_STEP`` up (kept when ``e < GROW_BELOW``)
  or, alternately, down (kept when ``e > SHRINK_ABOVE``: the window above only queued). An epoch
  ``DRIFT`` times slower than the settled one means capacity was lost: the window is set to
  ``window / r`` at once (what the server now serves without queueing).

Queue signal (gauges): requests waiting (more than ``QUEUE_FRACTION`` of those running, on
``QUEUED_POLLS`` polls in a row) shrink the window by our share of the queue; an epoch without a
queue while the window limits us grows it (x2 until the first queue, then ``PROBE_STEP``).

Overload (429/503, timeouts): the effective window (what was really in flight) is cut to
``OVERLOAD_CUT`` of it, at most once per round trip; it then climbs back to ``RECOVER_TO`` of the
level that overloaded and holds there (probes go on, so a server that grew is found again).

Floor: cuts come only from evidence (queueing sustained over an epoch, the queue gauges, or
overload); the window is never below 1 and always has a way back up (probes, slow growth).

One module because the controller is one algorithm: the tallies, the fitted latency line,
cohorts, slow start, probes and the 429 cut only make sense read together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

INITIAL_WINDOW = 8
FAST_BELOW = 0.2       # slow start grows x4 while the elasticity stays under this
EXIT_RISE = 1.5        # ... and leaves once one step made latency rise this much
GROW_BELOW = 0.6       # elasticity under which more window still buys throughput
SHRINK_ABOVE = 0.8     # elasticity over which the window above only queued
SETTLE_MARGIN = 1.05   # settle this much above the capacity Little's law gives
PROBE_STEP = 1.2       # up; down by PROBE_STEP_DOWN, one probe in DOWN_EVERY
PROBE_STEP_DOWN = 1.1
DOWN_EVERY = 3
PROBE_EVERY = 2        # steady epochs between two probes
DRIFT = 1.4            # an epoch this much slower than the settled one: capacity lost
OVERLOAD_CUT = 0.8
RECOVER_TO = 0.95
OVERLOAD_HOLD_EPOCHS = 8  # extra steady epochs before probing again after an overload
QUEUE_FRACTION = 0.05  # a queue is more than this fraction of the running requests (and 2)
QUEUED_POLLS = 2       # ... seen on this many polls in a row
METRICS_HOLD_EPOCHS = 2  # epochs without queue after a cut before growing again
MIN_COHORT, MAX_COHORT = 24, 256  # requests an epoch measures (scaled by the window)
MAX_ELASTICITY_ERROR = 0.15  # probes measure more answers until the elasticity is this sure
STRAGGLERS = 16        # decide without the last 1/16 of a cohort (the noise's long tail)


@dataclass
class Change:
    """A window change and why (for the INFO log and the report)."""

    old: int
    new: int
    reason: str


@dataclass
class Tally:
    """Mergeable sums over answers: count, latency, latency^2, tokens, tokens^2, latency x
    tokens."""

    n: int = 0
    latency: float = 0.0
    latency2: float = 0.0
    tokens: float = 0.0
    tokens2: float = 0.0
    latency_tokens: float = 0.0

    def add(self, seconds: float, tokens: int) -> None:
        t = float(max(1, tokens))
        self.n += 1
        self.latency += seconds
        self.latency2 += seconds * seconds
        self.tokens += t
        self.tokens2 += t * t
        self.latency_tokens += seconds * t

    def merge(self, other: "Tally") -> None:
        self.n += other.n
        self.latency += other.latency
        self.latency2 += other.latency2
        self.tokens += other.tokens
        self.tokens2 += other.tokens2
        self.latency_tokens += other.latency_tokens

    def as_list(self) -> list:
        return [self.n, self.latency, self.latency2, self.tokens, self.tokens2,
                self.latency_tokens]

    @classmethod
    def from_list(cls, values) -> "Tally":
        return cls(int(values[0]), *map(float, values[1:6]))

    def mean_latency(self) -> float:
        return self.latency / max(1, self.n)

    def relative_error(self) -> float:
        """Standard error of the mean latency, as a fraction of it, from the noise that answer
        lengths do not explain (the residuals of ``line``)."""
        if self.n < 2 or self.latency <= 0:
            return 1.0
        n = self.n
        mean_l, mean_t = self.latency / n, self.tokens / n
        variance = self.latency2 / n - mean_l ** 2
        var_t = self.tokens2 / n - mean_t ** 2
        if var_t > (0.05 * mean_t) ** 2:
            variance -= (self.latency_tokens / n - mean_t * mean_l) ** 2 / var_t
        return math.sqrt(max(0.0, variance) / n) / mean_l

    def line(self) -> tuple[float, float]:
        """(a, b) of ``latency = a + b * tokens`` fitted to these answers (both >= 0)."""
        n = max(1, self.n)
        mean_t, mean_l = self.tokens / n, self.latency / n
        var_t = self.tokens2 / n - mean_t ** 2
        b = 0.0
        if var_t > (0.05 * mean_t) ** 2:
            b = max(0.0, (self.latency_tokens / n - mean_t * mean_l) / var_t)
        a = mean_l - b * mean_t
        if a < 0:
            a, b = 0.0, mean_l / max(1e-9, mean_t)
        return a, b

    def slower_than(self, reference: "Tally") -> float:
        """These answers' latency over what ``reference``'s line predicts for them."""
        a, b = reference.line()
        predicted = a * self.n + b * self.tokens
        return self.latency / predicted if predicted > 0 else 1.0


@dataclass
class _Epoch:
    window: int
    tag: int
    tally: Tally = field(default_factory=Tally)
    sent: int = 0
    lost: int = 0
    cohort: int = 0         # requests it measures (more when the first ones were too noisy)
    closed: bool = False    # its cohort is complete: requests sent later carry another tag
    limited: bool = False   # the window, not the demand, limited what was in flight
    queued: bool = False    # the server's gauges showed a queue during it


class WindowController:
    """The learned window of one endpoint (between 1 and ``ceiling``)."""

    def __init__(self, ceiling: int, initial: int = INITIAL_WINDOW):
        self.ceiling = max(1, ceiling)
        self.window = min(self.ceiling, initial)
        self.phase = "slow_start"
        self.epoch = 0
        self.uses_metrics = False
        self.round_trip = 1.0            # mean latency of recent answers (seconds)
        self._turnover = 0               # sends that only fill a window that just rose
        self._current = _Epoch(self.window, self.epoch)
        self._previous: _Epoch | None = None
        self._reference: _Epoch | None = None
        self._steady_epochs = 0
        self._probes = 0
        self._climb: list[_Epoch] = []  # slow start's epochs, for the capacity estimate
        self._overloaded_at: int | None = None  # the window that last overloaded the server
        self._last_cut = float("-inf")
        self._peak_in_flight = 0  # the most in flight since the last change
        self._queued_polls = 0
        self._queued_once = False

    # -- inputs -------------------------------------------------------------------------------
    def on_load(self, demand: int, in_flight: int) -> None:
        """What the workers want in flight now, and have: is the window what limits us?"""
        self._peak_in_flight = max(self._peak_in_flight, in_flight)
        if demand >= self.window and in_flight >= 0.8 * self.window:
            self._current.limited = True

    def on_sent(self, tag: int, count: int) -> None:
        """``count`` requests were sent with epoch tag ``tag``."""
        current = self._current
        if tag != current.tag or not count:
            return
        if self._turnover > 0:
            self._turnover -= count
            if self._turnover <= 0:
                self._new_epoch()  # the window is full: the next requests measure it
            return
        current.sent += count
        if not current.closed and current.sent >= (current.cohort
                                                    or self._needed(current.window)):
            current.closed = True
            self.epoch += 1  # later requests are not part of this cohort

    def on_tally(self, tag: int, tally: Tally) -> Change | None:
        """Answers to requests sent during epoch ``tag``."""
        if not tally.n:
            return None
        self.round_trip = 0.8 * self.round_trip + 0.2 * tally.mean_latency()
        if tag != self._current.tag or self._turnover > 0:
            return None
        self._current.tally.merge(tally)
        return self._maybe_done()

    def on_lost(self, tag: int, count: int) -> Change | None:
        """``count`` requests sent during epoch ``tag`` ended without an answer."""
        if tag != self._current.tag or not count:
            return None
        self._current.lost += count
        return self._maybe_done()

    def _maybe_done(self) -> Change | None:
        current = self._current
        back = current.tally.n + current.lost
        if not current.closed or back < current.sent - current.sent // STRAGGLERS:
            return None
        if not current.tally.n:
            return self._new_epoch()
        return self._epoch_done()

    def on_overload(self, now: float) -> Change | None:
        """A 429/503 or a timeout at ``now``: a probe up goes back to the window it left;
        otherwise the window (the effective limit: the ceiling is never below it) is cut, at
        most once per round trip."""
        if now - self._last_cut < self.round_trip:
            return None
        self._last_cut = now
        self._overloaded_at = max(1, min(self.window, self._peak_in_flight or self.window))
        settled = self._previous
        if self.phase == "probing" and settled is not None and settled.window < self.window:
            self.phase = "steady"
            self._reference = settled
            self._steady_epochs = -OVERLOAD_HOLD_EPOCHS
            return self._set(settled.window, "the probe up met 429/503", keep=None)
        self.phase = "recovering"
        return self._set(max(1, int(self.window * OVERLOAD_CUT)),
                         "the server answered 429/503 or timed out", keep=None)

    def on_queue(self, running: int, waiting: int, in_flight: int) -> Change | None:
        """The server's queue gauges: shrink by our share of what waits."""
        self.uses_metrics = True
        if waiting <= max(2, QUEUE_FRACTION * running):
            self._queued_polls = 0
            return None
        self._queued_polls += 1
        if self._queued_polls < QUEUED_POLLS:  # a request between two scheduler steps
            return None
        self._queued_once = True
        self._current.queued = True
        if in_flight > self.window:
            return None  # the last cut has not taken effect yet: fewer will be sent
        share = min(1.0, in_flight / max(1, running + waiting))
        self.phase = "queue"
        self._steady_epochs = 0
        return self._set(max(1, self.window - math.ceil(waiting * share)),
                         f"{waiting} requests wait in the server's queue")

    # -- decisions ----------------------------------------------------------------------------
    @staticmethod
    def _needed(window: int) -> int:
        return max(MIN_COHORT, min(MAX_COHORT, window))

    def _epoch_done(self) -> Change | None:
        current = self._current
        if self.phase == "recovering":
            return self._recover(current)
        if self.uses_metrics:
            return self._metrics_epoch_done(current)
        if self.phase == "slow_start":
            return self._slow_start_done(current)
        if self.phase == "probing":
            return self._probe_done(current)
        return self._steady_done(current)

    def _elasticity(self, before: _Epoch, after: _Epoch) -> tuple[float, float]:
        """(r, e): ``after``'s latency over ``before``'s line, and its elasticity."""
        r = after.tally.slower_than(before.tally)
        return r, math.log(max(1e-9, r)) / math.log(after.window / before.window)

    def _measure_more(self, before: _Epoch, after: _Epoch) -> bool:
        """Whether ``after``'s cohort is too noisy to compare with ``before`` (the elasticity's
        standard error over ``MAX_ELASTICITY_ERROR``): if so it measures as many again."""
        error = math.hypot(before.tally.relative_error(), after.tally.relative_error())
        if (error / abs(math.log(after.window / before.window)) <= MAX_ELASTICITY_ERROR
                or after.tally.n >= MAX_COHORT * 4):
            return False
        after.cohort = after.sent + self._needed(after.window)
        after.closed = False
        after.tag = self.epoch  # the tag issued when it closed: its requests join the cohort
        return True

    def _slow_start_done(self, current: _Epoch) -> Change | None:
        previous = self._previous
        if not current.limited:
            return self._new_epoch()
        if previous is None or previous.window == current.window:
            self._climb = [current]
            return self._set(self.window * 4, "slow start", keep=current)
        r, e = self._elasticity(previous, current)
        self._climb.append(current)
        if e < GROW_BELOW and r < EXIT_RISE:
            return self._set(self.window * (4 if e < FAST_BELOW else 2),
                             f"latency barely rises (e={e:.2f})", keep=current)
        capacity = self._capacity(current)
        self.phase = "steady"
        self._steady_epochs = 0
        return self._set(round(capacity * SETTLE_MARGIN),
                         f"latency rises with the window (e={e:.2f}): the server serves about "
                         f"{capacity:.0f} at once", keep=None)

    def _capacity(self, saturated: _Epoch) -> float:
        """Little's law: the saturated window's throughput times the latency of the largest
        window of the climb whose throughput was clearly below it (no queue there yet)."""
        capacity = float(self._climb[0].window)
        for epoch in self._climb[:-1]:
            r = saturated.tally.slower_than(epoch.tally)  # = X(epoch) / X(saturated) x ratio
            if epoch.window * r < 0.9 * saturated.window:
                capacity = max(capacity, saturated.window / max(1.0, r))
        return capacity

    def _steady_done(self, current: _Epoch) -> Change | None:
        reference = self._reference
        if reference is None:
            self._reference = current
            return self._new_epoch()
        r = current.tally.slower_than(reference.tally)
        if r > DRIFT and current.limited:
            self._reference = None
            return self._set(max(1, round(current.window / r)),
                             f"latency rose {r:.1f}x above the settled level: capacity lost",
                             keep=None)
        if abs(math.log(r)) < 0.1:
            reference.tally.merge(current.tally)  # a larger sample for the next comparisons
        self._steady_epochs += 1
        if self._steady_epochs < PROBE_EVERY:
            return self._new_epoch()
        self._probes += 1
        down = self._probes % DOWN_EVERY == 0 and self.window > 1 and not self._overloaded_at
        return self._probe(current, up=not down)

    def _probe(self, settled: _Epoch, up: bool) -> Change | None:
        """Try one step up or down from ``settled`` (the epoch the probe is compared with)."""
        self._steady_epochs = 0
        if up and not settled.limited:
            return self._new_epoch()  # more would not be used
        target = (max(self.window + 1, round(self.window * PROBE_STEP)) if up
                  else max(1, min(self.window - 1, round(self.window / PROBE_STEP_DOWN))))
        if up and self._overloaded_at and target > self._overloaded_at:  # near the 429 level
            target = max(self.window + 1, min(target, max(self._overloaded_at,
                                                          round(self.window * 1.05))))
        self.phase = "probing"
        return self._set(target, "probing " + ("up" if up else "down"), keep=settled)

    def _probe_done(self, current: _Epoch) -> Change | None:
        """Keep a probe that paid (and go on the same way at once), else go back."""
        settled = self._previous
        if self._measure_more(settled, current):
            return None
        r, e = self._elasticity(settled, current)
        self.phase = "steady"
        went_up = current.window > settled.window
        keep = (e < GROW_BELOW and current.limited) if went_up else e > SHRINK_ABOVE
        if keep:
            self._reference = current
            if current.window > 1 and (current.window < self.ceiling or not went_up):
                return self._probe(current, up=went_up)
            return self._new_epoch()
        self._reference = settled
        self._steady_epochs = 0
        return self._set(settled.window, f"probe {'up' if went_up else 'down'} gained nothing "
                                         f"(e={e:.2f})", keep=None)

    def _recover(self, current: _Epoch) -> Change | None:
        """An epoch passed without overload after a cut: back to just under the level that
        overloaded, and hold there longer before the next probe above it."""
        self.phase = "steady"
        self._reference = None
        self._steady_epochs = -OVERLOAD_HOLD_EPOCHS
        goal = max(1, int((self._overloaded_at or self.window) * RECOVER_TO))
        if goal <= self.window or not current.limited:
            return self._new_epoch()
        return self._set(goal, "no overload since the cut", keep=None)

    def _metrics_epoch_done(self, current: _Epoch) -> Change | None:
        if current.queued or not current.limited:
            return self._new_epoch()
        if self._queued_once and self._steady_epochs < METRICS_HOLD_EPOCHS:
            self._steady_epochs += 1  # hold a little after a cut before trying more again
            return self._new_epoch()
        self._steady_epochs = 0
        growth = PROBE_STEP if self._queued_once else 4.0
        self.phase = "probing" if self._queued_once else "slow_start"
        return self._set(max(self.window + 1, int(self.window * growth)),
                         "no queue at the server")

    # -- bookkeeping --------------------------------------------------------------------------
    def _new_epoch(self) -> None:
        """Measure the same window again (a new epoch, no change)."""
        self.epoch += 1
        self._current = _Epoch(self.window, self.epoch)
        return None

    def _set(self, window: int, reason: str, keep: _Epoch | None = None) -> Change | None:
        """Move to ``window`` (within 1 and the ceiling); ``keep`` is the epoch to compare the
        next one with. After a rise the first ``window - old`` requests sent only fill the new
        window (they find less than it ahead of them); after a cut nothing is sent until fewer
        are in flight, so the next requests already measure it."""
        window = max(1, min(self.ceiling, int(window)))
        self._previous = keep
        old, self.window = self.window, window
        self._turnover = window - old if window > old else 0
        self._peak_in_flight = 0
        self._new_epoch()
        return Change(old, window, reason) if window != old else None


class FixedWindow:
    """A fixed ``max_in_flight``: halved by 429/503 (at most once per round trip) and grown back
    by 1/16 of it per round trip. Same inputs as ``WindowController``."""

    uses_metrics = False
    phase = "fixed"

    def __init__(self, ceiling: int):
        self.ceiling = max(1, ceiling)
        self.window = self.ceiling
        self.epoch = 0
        self.round_trip = 1.0
        self._level = float(self.ceiling)
        self._last_cut = float("-inf")

    def on_load(self, demand: int, in_flight: int) -> None:
        return None

    def on_queue(self, running: int, waiting: int, in_flight: int) -> Change | None:
        return None

    def on_sent(self, tag: int, count: int) -> None:
        return None

    def on_lost(self, tag: int, count: int) -> Change | None:
        return None

    def on_tally(self, tag: int, tally: Tally) -> Change | None:
        if not tally.n or self._level >= self.ceiling:
            return None
        self.round_trip = 0.8 * self.round_trip + 0.2 * tally.mean_latency()
        self._level = min(self.ceiling, self._level + tally.n * max(1.0, self.ceiling / 16)
                          / max(1.0, self._level))
        old, self.window = self.window, int(self._level)
        return Change(old, self.window, "back up after 429/503") if self.window != old else None

    def on_overload(self, now: float) -> Change | None:
        if now - self._last_cut < self.round_trip:
            return None
        self._last_cut = now
        self._level = max(1.0, min(self._level, self.ceiling) / 2)
        old, self.window = self.window, int(self._level)
        return Change(old, self.window, "the server answered 429/503 or timed out")
