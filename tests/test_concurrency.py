"""The window controller on recorded-style series (deterministic, no clock): a continuous-
batching server of capacity C serves b <= C sequences at t0 * (1 + b / C) per token and queues the
rest, so latency per token at window w is t0 * (1 + w / C) below C and 2 * t0 * w / C above."""

from __future__ import annotations

import random

import pytest

from nemocc_dask.llm.concurrency import WindowController


def per_token(window: int, capacity: int, t0: float = 0.01) -> float:
    if window <= capacity:
        return t0 * (1 + window / capacity)
    return 2 * t0 * window / capacity


def run_latency(ctl: WindowController, capacity, epochs: int, tokens=lambda: 200, windows=None):
    """Feed ``epochs`` epochs of answers as a window-limited client would see them."""
    for _ in range(epochs):
        epoch, window = ctl.epoch, ctl.window
        ctl.on_limited()
        while ctl.epoch == epoch:
            n = tokens()
            ctl.on_answer(ctl.sent(), per_token(window, capacity) * n, n)
        if windows is not None:
            windows.append(ctl.window)
    return ctl.window


def run_metrics(ctl: WindowController, capacity, epochs: int):
    for _ in range(epochs):
        epoch, window = ctl.epoch, ctl.window
        ctl.on_limited()
        for _ in range(2):  # two polls per round trip
            ctl.on_metrics(min(window, capacity), max(0, window - capacity), window)
        while ctl.epoch == epoch:
            ctl.on_answer(ctl.sent(), per_token(window, capacity) * 100, 100)
    return ctl.window


@pytest.mark.parametrize("capacity", [32, 256, 1024])
def test_latency_signal_settles_near_the_batching_capacity(capacity):
    windows: list[int] = []
    ctl = WindowController(ceiling=8192)
    run_latency(ctl, capacity, 60, windows=windows)
    assert 0.9 * capacity <= ctl.window <= 1.15 * capacity, windows
    first_close = next(i for i, w in enumerate(windows) if w >= 0.9 * capacity)
    assert first_close <= 12, windows  # slow start: round trips, not thousands of answers


@pytest.mark.parametrize("capacity", [32, 256, 1024])
def test_queue_signal_holds_just_above_the_capacity(capacity):
    ctl = WindowController(ceiling=8192)
    assert capacity <= run_metrics(ctl, capacity, 40) <= 1.1 * capacity + 1


def test_long_answers_do_not_fool_the_latency_signal():
    rng = random.Random(0)
    ctl = WindowController(ceiling=8192)
    window = run_latency(ctl, 256, 60, tokens=lambda: rng.choice([5, 50, 400, 3000]))
    assert 0.9 * 256 <= window <= 1.15 * 256


def test_the_ceiling_is_never_exceeded():
    ctl = WindowController(ceiling=100)
    windows: list[int] = []
    run_latency(ctl, 1024, 30, windows=windows)
    assert max(windows) == 100 and ctl.window == 100


def test_a_capacity_drop_brings_the_window_down_within_a_few_round_trips():
    for signal in ("latency", "metrics"):
        ctl = WindowController(ceiling=8192)
        run = run_latency if signal == "latency" else run_metrics
        run(ctl, 512, 50)
        assert ctl.window >= 0.9 * 512
        windows = []
        for _ in range(12):
            run(ctl, 128, 1)
            windows.append(ctl.window)
        assert min(windows[:8]) <= 1.25 * 128, (signal, windows)
        run(ctl, 128, 40)
        assert 0.9 * 128 <= ctl.window <= 1.25 * 128, signal


def test_without_demand_the_window_does_not_grow():
    ctl = WindowController(ceiling=8192)
    for _ in range(10):
        epoch = ctl.epoch
        while ctl.epoch == epoch:  # answers, but nobody waited for a slot
            ctl.on_answer(ctl.sent(), 1.0, 100)
    assert ctl.window == 8


def test_overload_halves_once_per_round_trip():
    ctl = WindowController(ceiling=8192, initial=64)
    change = ctl.on_overload(now=10.0, round_trip=1.0)
    assert change.new == 32 and "429" in change.reason
    assert ctl.on_overload(now=10.5, round_trip=1.0) is None  # answers sent before the cut
    assert ctl.on_overload(now=11.0, round_trip=1.0).new == 16


def test_answers_of_an_older_epoch_are_ignored():
    ctl = WindowController(ceiling=8192)
    ctl.on_limited()
    assert {ctl.sent() for _ in range(8)} == {None}  # turning the load over to the window
    tags = [ctl.sent() for _ in range(4)]
    for tag in tags:
        ctl.on_answer(tag, 1.0, 100)
    grown = ctl.window
    assert grown == 16
    for _ in range(100):
        ctl.on_answer(tags[0], 100.0, 1)  # late answers of the old window change nothing
    assert ctl.window == grown


def test_the_decision_waits_for_the_whole_cohort_not_the_first_answers():
    ctl = WindowController(ceiling=8192, initial=16)
    ctl.on_limited()
    [ctl.sent() for _ in range(16)]
    tags = [ctl.sent() for _ in range(8)]
    assert ctl.sent() is None  # the cohort: the 8 sent after the first window's worth
    for tag in tags[:7]:
        assert ctl.on_answer(tag, 0.1, 100) is None
    ctl.on_lost(tags[7])  # the last one failed: the cohort is back, the window grows
    assert ctl.window == 32


def test_a_request_caught_between_two_scheduler_steps_is_no_queue():
    ctl = WindowController(ceiling=8192, initial=100)
    for _ in range(5):  # a couple waiting on single polls, never twice in a row
        assert ctl.on_metrics(running=100, waiting=4, own_in_flight=100) is None
        assert ctl.on_metrics(running=100, waiting=0, own_in_flight=100) is None
    ctl.on_metrics(running=100, waiting=30, own_in_flight=100)
    change = ctl.on_metrics(running=100, waiting=30, own_in_flight=100)
    assert change.new == 100 - 24 and "30 requests wait" in change.reason


def test_capacity_lost_is_seen_in_any_answers_before_the_epoch_ends():
    ctl = WindowController(ceiling=8192)
    run_latency(ctl, 512, 50)
    window = ctl.window
    rate = 128 / (2 * 0.01) / 100  # answers per second at capacity 128
    changes = [ctl.on_answer(None, per_token(window, 128) * 100, 100, now=i / rate)
               for i in range(200)]
    first, second = [c for c in changes if c is not None][:2]
    assert "rose" in first.reason and "capacity lost" in second.reason
    assert 0.9 * 128 <= ctl.window <= 1.25 * 128


@pytest.mark.parametrize("text, expected", [
    ('vllm:num_requests_running{model_name="m"} 7.0\n'
     'vllm:num_requests_waiting{model_name="m"} 2.0\n'
     'vllm:num_requests_running{model_name="n"} 1.0\n'
     'vllm:num_requests_waiting{model_name="n"} 0\n', (8, 2)),
    ("sglang:num_running_reqs 12\nsglang:num_queue_reqs 0\n", (12, 0)),
    ("tgi_batch_current_size 4\ntgi_queue_size 9\n", (4, 9)),
    ("# HELP llamacpp:requests_processing Number of requests processing\n"
     "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 4\n"
     "llamacpp:requests_deferred 3\n", (4, 3)),
    ("process_cpu_seconds_total 3.5\n", None),
    ("vllm:num_requests_running 3\n", None),  # half a pair says nothing
])
def test_queue_gauges_of_each_server_kind(text, expected):
    from nemocc_dask.llm.telemetry import parse_queue_metrics

    assert parse_queue_metrics(text) == expected
