"""Admission control: a full queue is refused at once (429), a request that waited past
the queue timeout is answered 503 and never computed; both say when to retry.

The model thread is held by a real task (a gate), so the queue fills deterministically.
"""

from __future__ import annotations

import threading

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
