"""The window controller against several kinds of server physics (``physics.simulate``: a slot
cap with a FIFO queue, continuous batching, log-normal noise, 429 on overflow, the server's queue
gauges, capacity lost mid-run), and its rules one by one. Goal in every case: the server's slots
at least 90% busy, queueing at most a quarter of the service time, there within 30 s."""

from __future__ import annotations

import pytest

from physics import Server, simulate

from nemocc_dask.llm.concurrency import FixedWindow, Tally, WindowController



def _server(kind: str, slots: int, service: float) -> Server:
    if kind == "batching":  # tokens slow down with the batch, up to 2x at the slot count
        return Server(slots, per_token=service / 200 / 2, knee=slots)
    return Server(slots, overhead=service, sigma=0.3 if kind == "noisy" else 0.0,
                  overflow="429" if kind == "429" else "queue")


def _check(outcome):
    assert outcome.occupancy >= 0.9, outcome
    assert outcome.queueing <= 0.25, outcome
    assert outcome.t90 is not None and outcome.t90 <= 30, outcome


@pytest.mark.parametrize("kind", ["fixed", "batching", "noisy", "429", "gauges"])
@pytest.mark.parametrize("slots, service", [(32, 0.2), (256, 0.2), (48, 1.5)])
def test_the_window_fills_the_server_without_a_queue(kind, slots, service):
    seconds = max(60.0, service * 80)
    outcome = simulate(WindowController(ceiling=4096), _server(kind, slots, service), seconds,
                       tokens=lambda rng: rng.choice([20, 100, 400]), metrics=kind == "gauges")
    _check(outcome)
    if kind != "429":
        assert outcome.refused == 0


@pytest.mark.parametrize("kind", ["fixed", "batching", "noisy", "429", "gauges"])
def test_capacity_halved_mid_run_is_followed_down(kind):
    outcome = simulate(WindowController(ceiling=4096), _server(kind, 128, 0.2), 60.0,
                       tokens=lambda rng: rng.choice([20, 100, 400]), metrics=kind == "gauges",
                       events={20.0: 64})
    assert outcome.occupancy >= 0.9 and outcome.queueing <= 0.25, outcome
    after = [w for t, w in outcome.windows if t > 30.0]
    assert after and max(after) <= 1.5 * 64, outcome.windows


def test_answers_turning_longer_do_not_look_like_load():
    """A fixed-overhead server (the service time does not depend on answer length): answers
    five times longer from the middle of the run on (another task) leave the window alone."""
    def tokens(rng, state={"n": 0}):
        state["n"] += 1
        return 50 if state["n"] < 6000 else 250
    outcome = simulate(WindowController(ceiling=4096), Server(64, overhead=0.2), 60.0,
                       tokens=tokens)
    assert outcome.occupancy >= 0.9, outcome
    assert min(w for t, w in outcome.windows if t > 20) >= 0.9 * 64 / 1.2, outcome.windows


def test_the_ceiling_is_never_exceeded():
    outcome = simulate(WindowController(ceiling=100), Server(1000, overhead=0.1), 20.0)
    assert max(w for _, w in outcome.windows) == 100


def test_without_demand_the_window_does_not_grow():
    ctl = WindowController(ceiling=8192)
    for _ in range(20):
        ctl.on_load(demand=3, in_flight=3)
        ctl.on_sent(ctl.epoch, 40)
        tally = Tally()
        for _ in range(40):
            tally.add(0.1, 100)
        ctl.on_tally(ctl.epoch - 1, tally)
    assert ctl.window == 8


def _tally(n: int, seconds: float, tokens: int = 100) -> Tally:
    tally = Tally()
    for _ in range(n):
        tally.add(seconds, tokens)
    return tally


def test_a_decision_waits_for_its_whole_cohort():
    ctl = WindowController(ceiling=8192)
    ctl.on_load(demand=1000, in_flight=8)
    tag = ctl.epoch
    ctl.on_sent(tag, 24)  # the cohort is complete: later requests carry another tag
    assert ctl.epoch == tag + 1
    assert ctl.on_tally(tag, _tally(20, 0.1)) is None  # the fast ones are back first
    change = ctl.on_tally(tag, _tally(4, 0.5))
    assert change is not None and ctl.window == 32


def test_answers_of_an_older_epoch_are_ignored():
    ctl = WindowController(ceiling=8192)
    ctl.on_load(demand=1000, in_flight=8)
    old = ctl.epoch
    ctl.on_sent(old, 24)
    ctl.on_tally(old, _tally(24, 0.1))
    assert ctl.window == 32
    for _ in range(20):
        assert ctl.on_tally(old, _tally(50, 10.0)) is None  # late answers change nothing
    assert ctl.window == 32


def test_overload_cuts_once_per_round_trip():
    ctl = WindowController(ceiling=8192, initial=64)
    ctl.round_trip = 1.0
    change = ctl.on_overload(now=10.0)
    assert change.new == 51 and "429" in change.reason
    assert ctl.on_overload(now=10.5) is None  # answers to requests sent before the cut
    assert ctl.on_overload(now=11.1).new == 40


def test_a_fixed_window_halves_on_429_and_grows_back_per_round_trip():
    ctl = FixedWindow(32)
    ctl.round_trip = 1.0
    assert ctl.on_overload(now=5.0).new == 16
    assert ctl.on_overload(now=5.5) is None
    ctl.on_tally(0, _tally(16, 0.5))  # one round trip of answers: back by 32/16
    assert ctl.window == 18
    for _ in range(40):
        ctl.on_tally(0, _tally(32, 0.5))
    assert ctl.window == 32


def test_a_request_caught_between_two_scheduler_steps_is_no_queue():
    ctl = WindowController(ceiling=8192, initial=100)
    for _ in range(5):  # a couple waiting on single polls, never twice in a row
        assert ctl.on_queue(running=100, waiting=4, in_flight=100) is None
        assert ctl.on_queue(running=100, waiting=0, in_flight=100) is None
    ctl.on_queue(running=100, waiting=30, in_flight=100)
    change = ctl.on_queue(running=100, waiting=30, in_flight=100)
    assert change.new == 100 - 24 and "30 requests wait" in change.reason
    # until fewer are in flight than the new window, the same queue is not cut again
    assert ctl.on_queue(running=100, waiting=30, in_flight=100) is None


def test_tallies_merge_and_fit_overhead_and_per_token_cost():
    a, b = Tally(), Tally()
    for tokens in (10, 100, 1000):
        a.add(0.5 + 0.01 * tokens, tokens)
        b.add(2 * (0.5 + 0.01 * tokens), tokens)
    overhead, per_token = a.line()
    assert overhead == pytest.approx(0.5) and per_token == pytest.approx(0.01)
    assert b.slower_than(a) == pytest.approx(2.0)
    merged = Tally.from_list(a.as_list())
    merged.merge(b)
    assert merged.n == 6 and merged.latency == pytest.approx(a.latency + b.latency)


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
    ("vllm:num_requests_running e\nvllm:num_requests_running 2\n"  # garbage is skipped
     "vllm:num_requests_waiting -4\n", (2, 0)),  # a negative queue is an empty one
])
def test_queue_gauges_of_each_server_kind(text, expected):
    from nemocc_dask.llm.telemetry import parse_queue_metrics

    assert parse_queue_metrics(text) == expected
