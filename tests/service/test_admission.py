"""Admission control: a full queue is refused at once (429), a request that waited past
the queue timeout is answered 503 and never computed; both say when to retry.

The model thread is held by a real task (a gate), so the queue fills deterministically.
"""

from __future__ import annotations

import threading
import time

import httpx

from tests import image_factory as make
from tests.conftest import LiveServer, wait_until
from tests.service.test_service import metric_value


def files(n: int) -> list:
    return [("files", (f"{i}.jpg", make.jpeg())) for i in range(n)]


def hold_model_thread(srv: LiveServer) -> threading.Event:
    gate = threading.Event()
    srv.app.state.service.plane.batcher.executor.submit(gate.wait, 60)
    return gate


def queued(srv: LiveServer) -> float:
    return metric_value(httpx.get(f"{srv.url}/metrics").text, "seednet_queue_images")


def running(srv: LiveServer) -> float:
    return metric_value(httpx.get(f"{srv.url}/metrics").text, "seednet_running_images")


def test_a_full_queue_is_refused_at_once_with_retry_after(served_registry):
    with LiveServer(
        registry_root=served_registry,
        model_name="tiny",
        device="cpu",
        max_batch_size=4,
        max_queue_images=8,
        queue_timeout_ms=60_000,  # only the count bound bites here
    ) as srv:
        gate = hold_model_thread(srv)
        with httpx.Client(timeout=60) as client:
            results: dict[str, httpx.Response] = {}

            def post(name: str) -> None:
                results[name] = client.post(f"{srv.url}/predict", files=files(4))

            # a: taken into the (held) batch; b and c: 8 images waiting, the limit
            threads = [threading.Thread(target=post, args=(n,)) for n in "abc"]
            threads[0].start()
            wait_until(lambda: running(srv) == 4, 30, what="a to be taken")
            for t in threads[1:]:
                t.start()
            wait_until(lambda: queued(srv) == 8, 30, what="8 images queued")
            refused = client.post(f"{srv.url}/predict", files=files(1))
            gate.set()
            for t in threads:
                t.join(60)
        metrics = httpx.get(f"{srv.url}/metrics").text
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "overloaded"
    assert int(refused.headers["retry-after"]) >= 1
    assert [results[n].status_code for n in "abc"] == [200, 200, 200]
    assert metric_value(metrics, 'seednet_rejections_total{reason="queue_full"}') == 1
    assert metric_value(metrics, "seednet_queue_images") == 0


def test_a_request_past_the_queue_timeout_gets_503_and_is_never_computed(served_registry):
    with LiveServer(
        registry_root=served_registry, model_name="tiny", device="cpu", queue_timeout_ms=300
    ) as srv:
        before = metric_value(
            httpx.get(f"{srv.url}/metrics").text, "seednet_images_processed_total"
        )
        gate = hold_model_thread(srv)
        late = httpx.post(f"{srv.url}/predict", files=files(3), timeout=60)
        gate.set()
        served = httpx.post(f"{srv.url}/predict", files=files(1), timeout=60)
        metrics = httpx.get(f"{srv.url}/metrics").text
    assert late.status_code == 503
    assert late.json()["error"]["code"] == "deadline_exceeded"
    assert int(late.headers["retry-after"]) >= 1
    assert served.status_code == 200
    assert metric_value(metrics, "seednet_images_processed_total") - before == 1
    assert metric_value(metrics, 'seednet_rejections_total{reason="deadline"}') == 1


def test_one_client_runs_at_once_and_a_crowd_is_batched(served_registry):
    """The c=1 fast path: a request that finds the queue empty runs at once (no batch
    wait); requests that queue up behind a running batch are merged. Both are counted."""
    with LiveServer(
        registry_root=served_registry,
        model_name="tiny",
        device="cpu",
        max_batch_wait_ms=50,
        queue_timeout_ms=60_000,
    ) as srv:

        def batches(mode: str) -> float:
            text = httpx.get(f"{srv.url}/metrics").text
            return metric_value(text, f'seednet_batches_total{{mode="{mode}"}}')

        r = httpx.post(f"{srv.url}/predict", files=files(1), timeout=60)
        assert r.status_code == 200 and batches("immediate") == 1 and batches("batched") == 0
        gate = hold_model_thread(srv)
        with httpx.Client(timeout=60) as client:
            results: list[int] = []
            crowd = [
                threading.Thread(
                    target=lambda: results.append(
                        client.post(f"{srv.url}/predict", files=files(1)).status_code
                    )
                )
                for _ in range(5)
            ]
            crowd[0].start()
            wait_until(lambda: running(srv) == 1, 30, what="the first to be taken")
            for t in crowd[1:]:
                t.start()
            wait_until(lambda: queued(srv) == 4, 30, what="four to queue")
            gate.set()
            for t in crowd:
                t.join(60)
        assert results == [200] * 5
        assert batches("immediate") == 2  # the lone request, then the first of the crowd
        assert batches("batched") == 1  # the four that queued behind it, in one batch


def test_goodput_holds_under_four_times_overload(served_registry):
    """Admission keeps goodput: with the deadline small enough that the queue bound bites,
    four times the concurrency that saturates the service still gets at least half of its
    capacity answered with 200s, and everything else is a fast 429/503, never an error."""
    import asyncio

    async def load(url: str, clients: int, seconds: float) -> tuple[int, dict[int, int]]:
        statuses: dict[int, int] = {}
        ok = 0
        body = files(1)[0][1][1]

        async def client(c: httpx.AsyncClient) -> None:
            nonlocal ok
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                r = await c.post(f"{url}/predict", files={"file": ("a.jpg", body)})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                ok += r.status_code == 200
                if r.status_code != 200:
                    await asyncio.sleep(0.01)  # a client that honours the refusal a little

        async with httpx.AsyncClient(timeout=60) as c:
            await asyncio.gather(*(client(c) for _ in range(clients)))
        return ok, statuses

    with LiveServer(
        registry_root=served_registry,
        model_name="tiny",
        device="cpu",
        backend="torchscript",
        queue_timeout_ms=20,
        access_log=False,
    ) as srv:
        capacity, base = asyncio.run(load(srv.url, 4, 4.0))
        goodput, over = asyncio.run(load(srv.url, 16, 4.0))
        metrics = httpx.get(f"{srv.url}/metrics").text
    assert set(base) <= {200, 429, 503} and set(over) <= {200, 429, 503}, (base, over)
    assert goodput >= 0.5 * capacity, (capacity, goodput, over)
    refused = metric_value(metrics, "seednet_rejections_total")
    assert refused == sum(n for s, n in (*base.items(), *over.items()) if s != 200)


def test_images_being_decoded_count_as_ahead_of_the_next_request():
    """An admitted upload is decoded before it queues; while it is, a later request must
    see it ahead, or a crowd is decoded only to be refused at the queue (wasted CPU)."""
    from service.dataplane.batching import Batcher, ServiceRate
    from service.errors import Overloaded

    batcher = Batcher(lambda: None, max_batch_size=64, max_wait=0.002, queue_timeout=0.5)
    batcher.rate = ServiceRate(seconds_per_image=0.05, samples=1)  # 10 images in 0.5 s
    batcher.queued_images = 5
    with batcher.preparing(5):  # 10 ahead: one more would wait 0.5 s, still in time
        batcher.admit(1)
        with batcher.preparing(1):  # 11 ahead now: refused, with when to retry
            try:
                batcher.admit(1)
            except Overloaded as exc:
                assert exc.retry_after >= 1
            else:
                raise AssertionError("admitted a request that could not start in 0.5 s")
    assert batcher.preparing_images == 0  # decoded (or failed): no longer counted
    batcher.admit(5)

    counted = Batcher(lambda: None, 64, 0.002, max_queue_images=8)
    with counted.preparing(8):
        try:
            with counted.preparing(1):
                raise AssertionError("a ninth image was admitted past max_queue_images=8")
        except Overloaded:
            pass
    assert counted.preparing_images == 0


def test_a_request_waits_at_the_door_for_room_within_its_deadline():
    """Before its body is read, a request that cannot start in time waits (nothing read or
    decoded) and goes in as soon as the queue drains enough; the wait counts against its
    deadline; past it, 429. With an explicit max_queue_images the refusal is immediate."""
    import asyncio

    from service.dataplane.batching import WAITED, Batcher, ServiceRate
    from service.errors import Overloaded

    def slow_queue(**kw) -> Batcher:
        b = Batcher(lambda: None, max_batch_size=64, max_wait=0.002, queue_timeout=0.5, **kw)
        b.rate = ServiceRate(seconds_per_image=0.05, samples=1)
        b.queued_images = 12  # 0.6 s of work ahead: more than the 0.5 s deadline
        return b

    async def admitted_after_drain() -> tuple[float, float]:
        b = slow_queue()
        t0 = time.perf_counter()

        async def enter() -> float:  # (the wait is the request's own: its task's context)
            await b.wait_for_room(1)
            return WAITED.get()

        entering = asyncio.create_task(enter())
        await asyncio.sleep(0.15)
        assert not entering.done()  # still at the door
        b.queued_images = 2  # a batch took 10 images: 0.1 s ahead now
        b._room_changed()  # (what the batcher calls when a batch takes its images)
        waited = await entering
        return time.perf_counter() - t0, waited

    async def refused_at_deadline() -> float:
        b = slow_queue()
        t0 = time.perf_counter()
        try:
            await b.wait_for_room(1)
        except Overloaded:
            return time.perf_counter() - t0
        raise AssertionError("admitted although the queue never drained")

    async def refused_at_once_with_a_bound() -> float:
        b = slow_queue(max_queue_images=12)
        t0 = time.perf_counter()
        try:
            await b.wait_for_room(1)
        except Overloaded:
            return time.perf_counter() - t0
        raise AssertionError("admitted past max_queue_images")

    elapsed, waited = asyncio.run(admitted_after_drain())
    assert 0.15 <= elapsed < 0.45 and abs(waited - elapsed) < 0.05
    assert 0.4 <= asyncio.run(refused_at_deadline()) < 2.0
    assert asyncio.run(refused_at_once_with_a_bound()) < 0.1


def test_the_door_lets_in_only_what_can_start_in_time_when_room_appears():
    """Room for a few images lets in a few waiters, not the crowd at the door: those let
    in count as ahead of the rest until their images reach the queue; the rest are
    refused (429) at their deadline, and none waits past it. The newest go in (they have
    the most deadline left: adaptive LIFO under overload)."""
    import asyncio

    from service.dataplane.batching import Batcher, ServiceRate
    from service.errors import Overloaded

    async def crowd() -> tuple[int, int, float]:
        b = Batcher(lambda: None, max_batch_size=64, max_wait=0.002, queue_timeout=0.5)
        b.rate = ServiceRate(seconds_per_image=0.1, samples=1)
        b.queued_images = 10  # 1 s of work ahead: nobody fits in 0.5 s
        t0 = time.perf_counter()
        outcomes: dict[int, str] = {}

        async def enter(i: int) -> None:
            try:
                await b.wait_for_room(1)
                outcomes[i] = "in"
            except Overloaded:
                outcomes[i] = "429"

        tasks = []
        for i in range(20):  # arrivals 2 ms apart: request 19 is the newest
            tasks.append(asyncio.create_task(enter(i)))
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.02)
        assert not outcomes  # all at the door
        b.queued_images = 1  # 0.1 s ahead: room for about 3 more within ~0.4 s
        b._room_changed()
        await asyncio.gather(*tasks)
        let_in = sorted(i for i, o in outcomes.items() if o == "in")
        return let_in, list(outcomes.values()).count("429"), time.perf_counter() - t0

    let_in, refused, elapsed = asyncio.run(crowd())
    assert 1 <= len(let_in) <= 5, let_in
    assert let_in == list(range(20 - len(let_in), 20))  # the newest arrivals
    assert len(let_in) + refused == 20
    assert elapsed < 1.0


def test_after_an_overload_a_request_at_an_empty_queue_goes_in_at_once():
    """A waiter refused at its deadline leaves the door: the next request, once the queue
    has drained, is not held behind it (it was: every later request waited its whole
    deadline behind the line and was refused, and nothing ever ran again)."""
    import asyncio

    from service.dataplane.batching import Batcher, ServiceRate
    from service.errors import Overloaded

    async def after_overload() -> float:
        b = Batcher(lambda: None, max_batch_size=64, max_wait=0.002, queue_timeout=0.3)
        b.rate = ServiceRate(seconds_per_image=0.1, samples=1)
        b.queued_images = 10  # 1 s ahead: refused at its 0.3 s deadline
        try:
            await b.wait_for_room(1)
            raise AssertionError("admitted although 1 s of work was ahead")
        except Overloaded:
            pass
        b.queued_images = 0  # the overload is over
        t0 = time.perf_counter()
        await b.wait_for_room(1)
        return time.perf_counter() - t0

    assert asyncio.run(after_overload()) < 0.05
