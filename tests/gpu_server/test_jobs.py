"""jobs.py with a scripted in-process adapter: dedupe, queue, progress, cancel, stall, retention."""

from __future__ import annotations

import collections
import threading

import pytest

from gpu_bridge.errors import Conflict, InvalidModelName, JobNotFound, ModelNotFound, QueueFull
from gpu_bridge.jobs import Job, JobManager
from support.procs import wait_until

JOB_KEYS = {"id", "kind", "model", "state", "completed", "total", "percent", "status", "error", "error_code",
            "created_at", "started_at", "finished_at", "updated_at"}


class Feed:
    """What one pull stream yields: events pushed by the test, then an end or an error."""

    def __init__(self):
        self.cond = threading.Condition()
        self.items: collections.deque = collections.deque()
        self.cancelled = threading.Event()

    def push(self, *events):
        with self.cond:
            self.items.extend(events)
            self.cond.notify_all()

    def succeed(self):
        self.push({"status": "success"}, None)

    def fail(self, error):
        self.push(error)


class FakeAdapter:
    """``pull`` blocks on its model's feed; returns when cancelled, like OllamaAdapter."""

    def __init__(self):
        self.feeds: dict[str, Feed] = collections.defaultdict(Feed)
        self.calls: list[str] = []

    def pull(self, name, *, cancel=None, read_timeout=None):
        self.calls.append(name)
        assert read_timeout is not None and read_timeout > 0
        feed = self.feeds[name]
        while True:
            with feed.cond:
                # cancel is a plain Event: look at it at least every 10 ms
                feed.cond.wait_for(lambda: feed.items or (cancel and cancel.is_set()), timeout=0.01)
                if cancel is not None and cancel.is_set():
                    feed.cancelled.set()
                    return
                if not feed.items:
                    continue
                item = feed.items.popleft()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item


@pytest.fixture
def fake():
    return FakeAdapter()


@pytest.fixture
def manager_factory(fake):
    managers = []

    def make(**kw):
        manager = JobManager(fake, **kw)
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.shutdown()


def layer(digest, completed, total):
    return {"status": f"pulling {digest}", "digest": f"sha256:{digest}", "completed": completed, "total": total}


def state_is(job, state):
    return lambda: job.state == state


def test_submit_dedupes_spellings_of_one_model(manager_factory, fake):
    m = manager_factory()
    job, joined = m.submit("llama3")
    again, joined_again = m.submit("LLAMA3:latest")
    third, _ = m.submit("library/llama3")
    assert joined is False and joined_again is True
    assert again is job and third is job
    wait_until(lambda: fake.calls, what="the pull to start")
    assert fake.calls == ["llama3:latest"]
    assert m.find_active("registry.ollama.ai/library/llama3:latest") is job
    fake.feeds["llama3:latest"].succeed()
    assert m.wait(job.id, timeout=5).state == "succeeded"
    assert m.find_active("llama3") is None
    new, joined = m.submit("llama3")  # a finished pull is not joined
    assert new is not job and joined is False


def test_invalid_names_are_refused_before_any_pull(manager_factory, fake):
    m = manager_factory()
    with pytest.raises(InvalidModelName):
        m.submit("../etc")
    assert m.list() == [] and fake.calls == []


def test_progress_is_summed_over_layers_with_cached_layers_counted(manager_factory, fake):
    m = manager_factory()
    job, _ = m.submit("m:1")
    feed = fake.feeds["m:1"]
    feed.push({"status": "pulling manifest"}, layer("aaa", 0, 1000), layer("bbb", 500, 500), layer("aaa", 250, 1000))
    wait_until(lambda: job.completed == 750, what="progress")
    snapshot = job.to_dict()
    assert (snapshot["completed"], snapshot["total"], snapshot["percent"]) == (750, 1500, 50.0)
    assert snapshot["status"] == "pulling aaa" and snapshot["state"] == "running"
    feed.push(layer("aaa", 1000, 1000), {"status": "verifying sha256 digest"}, {"status": "writing manifest"})
    feed.succeed()
    done = m.wait(job.id, timeout=5).to_dict()
    assert set(done) == JOB_KEYS
    assert (done["state"], done["completed"], done["total"], done["percent"]) == ("succeeded", 1500, 1500, 100.0)
    assert done["status"] == "success" and done["error"] is None and done["error_code"] is None
    assert done["created_at"].endswith("Z") and done["finished_at"] >= done["started_at"] >= done["created_at"]


def test_percent_is_null_before_any_size_is_known(manager_factory):
    job, _ = manager_factory().submit("m:1")
    assert job.to_dict()["percent"] is None


def test_error_line_fails_the_job_with_the_mapped_code(manager_factory, fake):
    m = manager_factory()
    job, _ = m.submit("ghost")
    fake.feeds["ghost:latest"].fail(ModelNotFound("model 'ghost' does not exist"))
    job = m.wait(job.id, timeout=5)
    assert (job.state, job.error_code, job.error_status) == ("failed", "model_not_found", 404)
    assert "does not exist" in job.error


def test_unexpected_exception_fails_the_job_and_frees_the_slot(manager_factory, fake):
    m = manager_factory(max_concurrent=1)
    job, _ = m.submit("a")
    fake.feeds["a:latest"].fail(RuntimeError("bug"))
    assert m.wait(job.id, timeout=5).error_code == "ollama_error"
    nxt, _ = m.submit("b")
    wait_until(state_is(nxt, "running"), what="the next pull to run")


def test_stream_ending_without_success_fails(manager_factory, fake):
    m = manager_factory()
    job, _ = m.submit("a")
    fake.feeds["a:latest"].push({"status": "pulling manifest"}, None)
    assert m.wait(job.id, timeout=5).state == "failed"


def test_queue_limit_concurrency_and_fifo(manager_factory, fake):
    m = manager_factory(max_concurrent=1, max_queued=1)
    first, _ = m.submit("a")
    second, _ = m.submit("b")
    with pytest.raises(QueueFull) as info:
        m.submit("c")
    assert info.value.status == 429 and info.value.retry_after >= 1
    assert m.submit("b")[1] is True  # joining a queued pull is always allowed
    wait_until(state_is(first, "running"), what="first running")
    assert m.counts() == {"running": 1, "queued": 1} and second.state == "queued"
    fake.feeds["a:latest"].succeed()
    wait_until(state_is(second, "running"), what="the queued pull to start")
    assert fake.calls == ["a:latest", "b:latest"]
    fake.feeds["b:latest"].succeed()
    assert m.wait(second.id, timeout=5).state == "succeeded"
    assert m.counts() == {"running": 0, "queued": 0}


def test_zero_queue_refuses_when_all_slots_are_busy(manager_factory):
    m = manager_factory(max_concurrent=2, max_queued=0)
    m.submit("a")
    m.submit("b")
    with pytest.raises(QueueFull):
        m.submit("c")


def test_cancel_queued_job_never_reaches_ollama(manager_factory, fake):
    m = manager_factory(max_concurrent=1, max_queued=4)
    first, _ = m.submit("a")
    queued, _ = m.submit("b")
    cancelled = m.cancel(queued.id)
    assert cancelled.state == "cancelled" and cancelled.error_code == "cancelled"
    fake.feeds["a:latest"].succeed()
    m.wait(first.id, timeout=5)
    third, _ = m.submit("c")
    fake.feeds["c:latest"].succeed()
    m.wait(third.id, timeout=5)
    assert "b:latest" not in fake.calls


def test_cancel_running_job_closes_its_stream(manager_factory, fake):
    m = manager_factory()
    job, _ = m.submit("a")
    fake.feeds["a:latest"].push(layer("aaa", 10, 100))
    wait_until(lambda: job.completed == 10, what="progress")
    assert m.cancel(job.id).state == "cancelled"
    assert fake.feeds["a:latest"].cancelled.wait(5)
    assert m.wait(job.id, timeout=1).finished_at is not None
    with pytest.raises(Conflict):
        m.cancel(job.id)
    wait_until(lambda: m.counts() == {"running": 0, "queued": 0}, what="slot freed")


def test_unknown_job(manager_factory):
    m = manager_factory()
    with pytest.raises(JobNotFound):
        m.get("nope")
    with pytest.raises(JobNotFound):
        m.cancel("nope")
    with pytest.raises(JobNotFound):
        m.wait("nope", timeout=0)


def test_stall_when_bytes_stop_while_lines_continue(manager_factory, fake):
    m = manager_factory(stall_timeout=0.3)
    job, _ = m.submit("a")
    feed = fake.feeds["a:latest"]
    feed.push(layer("aaa", 10, 100))
    stop = threading.Event()

    def same_bytes_forever():  # Ollama's real stall: progress lines keep coming, completed stays put
        while not stop.wait(0.02):
            feed.push(layer("aaa", 10, 100))

    threading.Thread(target=same_bytes_forever, daemon=True).start()
    try:
        job = m.wait(job.id, timeout=5)
    finally:
        stop.set()
    assert (job.state, job.error_code, job.error_status) == ("failed", "pull_stalled", 504)
    assert "no download progress for 0.3 s" in job.error
    assert feed.cancelled.is_set()  # the Ollama stream was closed


def test_stall_when_the_stream_goes_silent(manager_factory, fake):
    m = manager_factory(stall_timeout=0.2)
    job, _ = m.submit("a")
    assert m.wait(job.id, timeout=5).error_code == "pull_stalled"


def test_steady_progress_longer_than_the_stall_timeout_is_not_a_stall(manager_factory, fake):
    m = manager_factory(stall_timeout=0.3)
    job, _ = m.submit("a")
    feed = fake.feeds["a:latest"]
    ticks = threading.Event()

    def advance():
        for completed in range(1, 41):  # 40 steps of 25 ms: about 1 s in all, never 0.3 s without bytes
            ticks.wait(0.025)
            feed.push(layer("aaa", completed, 40))
        feed.succeed()

    threading.Thread(target=advance, daemon=True).start()
    assert m.wait(job.id, timeout=10).state == "succeeded"


def test_retention_prunes_finished_jobs(manager_factory, fake):
    m = manager_factory(retention=0.0)
    job, _ = m.submit("a")
    fake.feeds["a:latest"].succeed()
    m.wait(job.id, timeout=5)
    wait_until(lambda: m.list() == [], what="pruning")
    with pytest.raises(JobNotFound):
        m.get(job.id)


def test_list_is_newest_first(manager_factory):
    m = manager_factory(max_concurrent=1)
    ids = [m.submit(name)[0].id for name in ("a", "b", "c")]
    assert [j.id for j in m.list()] == ids[::-1]


def test_on_change_sees_each_state_and_a_broken_listener_is_harmless(fake):
    seen = []

    def listener(job: Job):
        seen.append(job.state)
        raise ValueError("listener bug")

    m = JobManager(fake, on_change=listener)
    try:
        job, _ = m.submit("a")
        fake.feeds["a:latest"].push(layer("aaa", 1, 2))
        fake.feeds["a:latest"].succeed()
        assert m.wait(job.id, timeout=5).state == "succeeded"
    finally:
        m.shutdown()
    assert seen[0] == "queued" and "running" in seen and seen[-1] == "succeeded"


def test_shutdown_cancels_active_pulls_and_refuses_new_ones(fake):
    m = JobManager(fake, max_concurrent=1)
    running, _ = m.submit("a")
    queued, _ = m.submit("b")
    wait_until(lambda: fake.calls, what="pull started")
    m.shutdown()
    assert running.state == "cancelled" and queued.state == "cancelled"
    assert fake.feeds["a:latest"].cancelled.wait(5)
    with pytest.raises(Exception) as info:
        m.submit("c")
    assert getattr(info.value, "status", None) == 503
