"""Every query of the dashboard, the alerting rules and the autoscalers names metrics and
labels that a real service exports.

A real uvicorn on loopback serves the tiny model; real requests go through /predict, the
v2 HTTP protocol (tritonclient.http) and gRPC (tritonclient.grpc), including a refused
upload, a request refused by admission control and an explanation, so that every metric family has
samples, then /metrics is read as Prometheus would scrape it.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml

from deploy import queries
from deploy.queries import Query
from tests.conftest import LiveServer
from tests.image_factory import noise_jpeg, text_file

REPO = queries.REPO
AUTOSCALERS = (
    REPO / "deploy/k8s/components/keda/scaledobject.yaml",
    REPO / "deploy/k8s/components/hpa/horizontalpodautoscaler.yaml",
    REPO / "deploy/k8s/kserve/inferenceservice.yaml",
)
# Labels whose every value the traffic below produces: a matcher on them must match one.
EXHAUSTIVE_LABELS = ("route", "protocol", "stage")


def v2_inputs(module, pixels: np.ndarray):
    i = module.InferInput("images", list(pixels.shape), "UINT8")
    i.set_data_from_numpy(pixels)
    return [i]


@pytest.fixture(scope="module")
def exposition_text(served_registry) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    with LiveServer(
        registry_root=served_registry,
        model_name="tiny",
        device="cpu",
        backend="torchscript",
        max_queue_images=4,  # a 5-image request is refused: seednet_rejections has a sample
        grpc_port=0,
    ) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            for seed in range(3):
                r = http.post("/predict", files={"file": ("a.jpg", noise_jpeg(seed=seed))})
                assert r.status_code == 200, r.text
            r = http.post("/predict", files={"file": ("a.txt", text_file())})
            assert r.status_code == 415, r.text
            r = http.post(
                "/explain", params={"blocks": "7"}, files={"file": ("a.jpg", noise_jpeg())}
            )
            assert r.status_code == 200, r.text  # (starts the explanation worker: lazy)
            five = [("files", (f"{i}.jpg", noise_jpeg(seed=i))) for i in range(5)]
            r = http.post("/predict", files=five)
            assert r.status_code == 429, r.text
        v2 = httpclient.InferenceServerClient(srv.url.removeprefix("http://"))
        try:
            result = v2.infer("tiny", v2_inputs(httpclient, pixels))
            assert result.as_numpy("probabilities").shape == (2, 10)
        finally:
            v2.close()
        rpc = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            result = rpc.infer("tiny", v2_inputs(grpcclient, pixels))
            assert result.as_numpy("probabilities").shape == (2, 10)
        finally:
            rpc.close()
        return httpx.get(f"{srv.url}/metrics", timeout=30).text


@pytest.fixture(scope="module")
def exposition(exposition_text) -> queries.Exposition:
    return queries.read_exposition(exposition_text)


def autoscaler_queries() -> list[Query]:
    found = []
    for path in AUTOSCALERS:
        objects = [o for o in yaml.safe_load_all(path.read_text()) if o]
        found += queries.manifest_queries(objects, str(path.relative_to(REPO)))
    return found


def every_query() -> list[Query]:
    return (
        queries.dashboard_queries()
        + queries.rule_queries()
        + queries.adapter_queries()
        + autoscaler_queries()
    )


def test_there_are_queries_in_every_source() -> None:
    sources = {q.source.split(":")[0] for q in every_query()}
    assert {
        "grafana-dashboard.json",
        "prometheus-rules.yaml",
        "prometheus-adapter-values.yaml",
        "deploy/k8s/components/keda/scaledobject.yaml",
        "deploy/k8s/components/hpa/horizontalpodautoscaler.yaml",
        "deploy/k8s/kserve/inferenceservice.yaml",
    } <= sources
    assert len(queries.dashboard_queries()) >= 20 and len(queries.rule_queries()) == 9


def test_every_query_names_metrics_and_labels_on_metrics(exposition) -> None:
    problems = queries.missing_metrics(every_query(), exposition)
    assert not problems, "queries name what /metrics does not have:\n" + "\n".join(
        map(str, problems)
    )


def test_route_stage_and_protocol_matchers_match_real_values(exposition) -> None:
    problems = queries.unmatched_values(every_query(), exposition, EXHAUSTIVE_LABELS)
    assert not problems, "\n".join(map(str, problems))


def test_the_autoscalers_scale_on_the_queue_depth(exposition) -> None:
    for query in autoscaler_queries():
        assert queries.metric_names([query]) == {"seednet_queue_images"}, query
    assert exposition.families["seednet_queue_images"] == "seednet_queue_images (gauge)"


def test_the_check_reports_planted_mistakes(exposition) -> None:
    planted = [
        Query("typo", "sum(seednet_queue_depth)"),
        Query("counter suffix on a histogram", "rate(seednet_batch_size_total[5m])"),
        Query("histogram suffix on a gauge", "seednet_queue_images_count"),
        Query("no such label", 'sum(rate(seednet_requests_total{model="tiny"}[5m]))'),
        Query("no such grouping", "sum by (version) (seednet_queue_images)"),
        Query("fine", "histogram_quantile(0.9, sum by (le) (rate(seednet_batch_size_bucket[5m])))"),
        Query("fine too", 'sum by (pod) (seednet_model_info{namespace="x", version="1"})'),
        Query("no such route", 'rate(seednet_requests_total{route="/v1/predict"}[5m])'),
    ]
    problems = [str(p) for p in queries.missing_metrics(planted, exposition)]
    assert problems == [
        "typo: metric seednet_queue_depth is not on /metrics",
        "counter suffix on a histogram: metric seednet_batch_size_total is not on /metrics",
        "histogram suffix on a gauge: metric seednet_queue_images_count is not on /metrics",
        "no such label: seednet_requests_total has no label 'model' on /metrics",
        "no such grouping: groups by 'version', a label none of ['seednet_queue_images'] has",
    ]
    values = [str(p) for p in queries.unmatched_values(planted, exposition, EXHAUSTIVE_LABELS)]
    assert values == [
        'no such route: route="/v1/predict" matches no value of seednet_requests_total\'s '
        "route on /metrics"
    ]
    with pytest.raises(ValueError, match="not valid PromQL"):
        queries.missing_metrics([Query("syntax", "sum(rate(x[5m])")], exposition)
