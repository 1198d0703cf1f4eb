"""Rollouts against a real server: tiny@1 serves, tiny@2 (other weights) is a candidate;
the slow tests add two variants of tiny@1 (training.variants): a bad one, its class names
shifted by one, and a good one, its weights plus a little noise.

Real CIFAR-10 test images go through /predict, /v2 and gRPC on a loopback uvicorn; the
rollout record lives in a registry in a temporary folder; the decisions are the
service's own, taken on the evidence of the traffic these tests send.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import threading
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from registry import Registry
from tests.conftest import ADMIN_TOKEN, LiveServer, wait_until

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def test_images(cifar_dir) -> list[tuple[str, bytes]]:
    """20 real test images of every class: (class, JPEG bytes)."""
    out = []
    for class_dir in sorted((cifar_dir / "test").iterdir()):
        for path in sorted(class_dir.iterdir())[:20]:
            out.append((class_dir.name, path.read_bytes()))
    return out


def serve(root: Path, **overrides) -> LiveServer:
    settings = {
        "registry_root": root,
        "model_name": "tiny",
        "device": "cpu",
        "backend": "torchscript",
        "admin_token": ADMIN_TOKEN,
        "rollout_poll_s": 0.2,
        "queue_timeout_ms": 60_000,  # a busy machine: these tests are not about admission
    }
    return LiveServer(**{**settings, **overrides})


def copy_of(served_registry: Path, tmp_path: Path) -> Path:
    root = tmp_path / "registry"
    shutil.copytree(served_registry, root)
    return root


def start(url: str, candidate: str, steps: list[dict], rule: dict, **extra) -> httpx.Response:
    body = {"candidate": candidate, "steps": steps, "rule": rule, **extra}
    return httpx.post(f"{url}/models/tiny/rollout", json=body, headers=ADMIN, timeout=120)


async def send(
    url: str,
    images: list[tuple[str, bytes]],
    n: int,
    concurrency: int = 4,
    headers=lambda i: {},
) -> list[tuple[int, dict, dict]]:
    """``n`` /predict requests (image ``i % len(images)``, headers ``headers(i)``), by
    ``concurrency`` clients: [(status, response headers, body)] in request order."""
    results: list = [None] * n
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    async with httpx.AsyncClient(timeout=120) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                _, data = images[i % len(images)]
                r = await client.post(
                    f"{url}/predict", files={"file": ("x.jpg", data)}, headers=headers(i)
                )
                results[i] = (r.status_code, dict(r.headers), r.json())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def version_of(result: tuple[int, dict, dict]) -> str:
    status, headers, body = result
    assert status == 200, body
    assert headers["x-model-version"] == body["model"]["version"]  # header and body agree
    return body["model"]["version"]


def rollout(url: str) -> dict:
    r = httpx.get(f"{url}/models/tiny/rollout", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def protocol_answers(srv: LiveServer, pin: str) -> tuple[httpx.Response, str, str]:
    """One /v2 (JSON) and one gRPC request pinned to ``pin`` with X-Model-Version: the /v2
    response, and gRPC's model_version field and x-model-version initial metadata."""
    import grpc

    from service.frontends.oip.codec import grpc_predict_v2_pb2 as pb
    from service.frontends.oip.codec import grpc_predict_v2_pb2_grpc as pb_grpc

    pixels = np.random.default_rng(0).integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    body = {"inputs": [{"name": "images", "shape": [1, 3, 32, 32], "datatype": "UINT8",
                        "data": pixels.ravel().tolist()}]}  # fmt: skip
    v2 = httpx.post(
        f"{srv.url}/v2/models/tiny/infer", json=body, headers={"x-model-version": pin}, timeout=60
    )
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 3, 32, 32])
    request.raw_input_contents.append(pixels.tobytes())
    with grpc.insecure_channel(srv.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response, call = stub.ModelInfer.with_call(
            request, metadata=(("x-model-version", pin),), timeout=60
        )
    header = dict(call.initial_metadata()).get("x-model-version", "")
    return v2, response.model_version, header


# ------------------------------------------------------------------------------ the split


@pytest.mark.slow
def test_a_canary_split_lands_within_tolerance_and_a_client_key_sticks(
    served_registry, tmp_path, test_images
):
    root = copy_of(served_registry, tmp_path)
    never = {"min_samples": 10**9}  # no decision: this test is about the split
    with serve(root, grpc_port=0) as srv:
        r = start(srv.url, "2", [{"mode": "canary", "percent": 30}], never)
        assert r.status_code == 200, r.text
        assert r.json()["converged"] is True and r.json()["running"] is True

        plain = asyncio.run(send(srv.url, test_images, 1000))
        versions = Counter(version_of(x) for x in plain)
        # 1,000 draws at 30 %: sd 1.45 points; +-5 points is 3.4 sd
        assert set(versions) == {"1", "2"} and abs(versions["2"] / 1000 - 0.30) < 0.05, versions

        keys = [f"client-{i}" for i in range(300)]
        keyed = asyncio.run(
            send(srv.url, test_images, 600, headers=lambda i: {"x-client-key": keys[i % 300]})
        )
        by_key: dict[str, set[str]] = {}
        for i, x in enumerate(keyed):
            by_key.setdefault(keys[i % 300], set()).add(version_of(x))
        assert all(len(v) == 1 for v in by_key.values()), "a client key changed version"
        share = sum(v == {"2"} for v in by_key.values()) / len(by_key)
        assert abs(share - 0.30) < 0.09, share  # 300 keys: sd 2.6 points

        pinned = asyncio.run(
            send(srv.url, test_images, 40, headers=lambda i: {"x-model-version": "2"})
        )
        assert {version_of(x) for x in pinned} == {"2"}
        r = httpx.post(
            f"{srv.url}/predict",
            files={"file": ("x.jpg", test_images[0][1])},
            headers={"x-model-version": "7"},
        )
        assert r.status_code == 400 and "version '7' is not loaded" in r.json()["error"]["message"]

        # every protocol says which version answered: body and header (gRPC: metadata)
        for pin in ("1", "2"):
            v2, grpc_version, grpc_header = protocol_answers(srv, pin)
            assert v2.status_code == 200, v2.text
            assert v2.headers["x-model-version"] == v2.json()["model_version"] == pin
            assert grpc_version == grpc_header == pin

        # the per-version evidence, on /metrics and in the rollout's status
        status = rollout(srv.url)
        assert status["evidence"]["candidate"]["version"] == "2"
        assert status["evidence"]["candidate"]["images"] >= versions["2"]
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'seednet_version_requests_total{name="tiny",traffic="live",version="2"}' in metrics
        assert "seednet_rollout_active 1.0" in metrics


# ------------------------------------------------------------------------------ shadow


def test_shadow_traffic_never_changes_a_response_and_measures_agreement(
    served_registry, tmp_path, test_images
):
    """Every answer under 100 % shadow is byte for byte the one without a rollout; the
    comparisons the service counts are the ones two models loaded here compute."""
    from service.dataplane.images import ImageLimits, preprocess
    from service.lifecycle.loading import load_backend

    root = copy_of(served_registry, tmp_path)
    images = test_images[::2]  # 100 images
    with serve(root, grpc_port=0) as srv:
        before = asyncio.run(send(srv.url, images, len(images), concurrency=1))
        r = start(srv.url, "2", [{"mode": "shadow", "percent": 100}], {"min_samples": 10**9})
        assert r.status_code == 200, r.text
        during = asyncio.run(send(srv.url, images, len(images), concurrency=1))
        wait_until(
            lambda: (
                (rollout(srv.url)["evidence"] or {}).get("shadow", {}).get("compared", 0)
                >= len(images)
            ),
            60,
            0.1,
            "every shadow run to be compared",
        )
        evidence = rollout(srv.url)["evidence"]
        # a request may pin either loaded version; every protocol says which answered
        for pin in ("1", "2"):
            v2, grpc_version, grpc_header = protocol_answers(srv, pin)
            assert v2.status_code == 200, v2.text
            assert v2.headers["x-model-version"] == v2.json()["model_version"] == pin
            assert grpc_version == grpc_header == pin
    assert [x[2] for x in during] == [x[2] for x in before]  # same bodies, version 1
    assert {version_of(x) for x in during} == {"1"}

    reg = Registry(root)
    limits = ImageLimits(max_bytes=10**7, max_pixels=10**8, max_request_pixels=10**8)
    pixels = np.stack([preprocess(data, limits).array for _, data in images])
    tops = {}
    for v in ("1", "2"):
        mv = reg.resolve("tiny", v)
        probs = load_backend(reg, mv, "torchscript", "cpu").run(pixels)["probabilities"]
        tops[v] = [mv.manifest.class_names[i] for i in probs.argmax(axis=1)]
    agreed = sum(a == b for a, b in zip(tops["1"], tops["2"], strict=True))
    shadow = evidence["shadow"]
    assert shadow["compared"] == len(images) and shadow["dropped"] == 0
    assert shadow["agreement"] == pytest.approx(agreed / len(images), abs=1e-4)
    pairs = Counter((a, b) for a, b in zip(tops["1"], tops["2"], strict=True) if a != b)
    top = {(d["stable"], d["candidate"]): d["count"] for d in shadow["disagreements"]}
    assert all(pairs[k] == n for k, n in top.items()) and len(top) == min(10, len(pairs))
    assert evidence["candidate"]["requests"] == len(images)  # shadow runs of tiny@2
    assert evidence["stable"]["requests"] == len(images)


# ------------------------------------------------------------------------------ decisions


@pytest.fixture(scope="module")
def rehearsal_registry(served_registry, tmp_path_factory) -> tuple[Path, str, str]:
    """tiny@1 serving, plus two variants of it (training.variants): a bad one (the class
    names shifted by one) and a good one (weights plus 1 % noise). (root, bad, good)"""
    from training.variants import publish_variant

    root = tmp_path_factory.mktemp("rehearsal") / "registry"
    shutil.copytree(served_registry, root)
    reg = Registry(root)
    bad = publish_variant(reg, "tiny@1", shift_names=True).version
    good = publish_variant(reg, "tiny@1", noise=0.01, seed=1).version
    return root, bad, good


class Load:
    """Clients sending /predict without pause while the block runs: every answer's
    (status, version), so a test can count failed requests and who answered."""

    def __init__(self, url: str, images: list[tuple[str, bytes]], clients: int = 2) -> None:
        self.url, self.images, self.clients = url, images, clients
        self.answers: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, offset: int) -> None:
        with httpx.Client(timeout=120) as client:
            i = offset
            while not self._stop.is_set():
                _, data = self.images[i % len(self.images)]
                i += self.clients
                r = client.post(f"{self.url}/predict", files={"file": ("x.jpg", data)})
                version = r.json()["model"]["version"] if r.status_code == 200 else None
                self.answers.append((r.status_code, version))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)

    @property
    def failed(self) -> list[int]:
        return [status for status, _ in self.answers if status != 200]


def _state(url: str) -> dict:
    return rollout(url)["rollout"]


@pytest.mark.slow
def test_a_bad_candidate_is_rolled_back_a_good_one_promoted_across_a_restart(
    rehearsal_registry, tmp_path, test_images
):
    """Under steady load: the shifted-names variant fails the agreement rule in its shadow
    step and is dropped (the alias stays); the noisy variant passes shadow, the server is
    restarted in its canary step, and the new process carries on and promotes it. No
    request fails; every decision is in the alias journal with its evidence."""
    source, bad, good = rehearsal_registry
    root = copy_of(source, tmp_path)
    steps = [{"mode": "shadow", "percent": 100}, {"mode": "canary", "percent": 20}]
    rule = {"min_samples": 30, "min_agreement": 0.8, "max_p99_ratio": 20}
    with serve(root) as srv, Load(srv.url, test_images) as load:
        r = start(srv.url, bad, steps, rule)
        assert r.status_code == 200, r.text
        wait_until(lambda: _state(srv.url)["state"] != "running", 120, 0.2, "a decision")
        failed = _state(srv.url)
        assert failed["state"] == "rolled_back", failed["decisions"]
        rollback = failed["decisions"][-1]
        assert rollback["action"] == "rollback" and "top-1 agreement" in rollback["reason"]
        assert rollback["evidence"]["shadow"]["agreement"] < 0.8

        r = start(srv.url, good, steps, rule)
        assert r.status_code == 200, r.text
        wait_until(lambda: _state(srv.url)["step"] == 1, 120, 0.1, "the canary step")
    first = load.answers
    assert load.failed == [] and len(first) > 0
    # the bad candidate only ever ran in shadow: no client saw its answers
    assert {v for _, v in first} <= {"1", good} and "1" in {v for _, v in first}
    assert Registry(root).resolve("tiny", "production").version == "1"

    with serve(root) as srv, Load(srv.url, test_images) as load:
        resumed = _state(srv.url)
        assert (resumed["state"], resumed["step"]) == ("running", 1)  # the advance survived
        wait_until(lambda: _state(srv.url)["state"] != "running", 180, 0.2, "the promote")
        promoted = _state(srv.url)
        assert promoted["state"] == "promoted", promoted["decisions"]
        wait_until(lambda: load.answers[-4:] and {v for _, v in load.answers[-4:]} == {good},
                   60, 0.1, "the new version to answer")  # fmt: skip
    assert load.failed == []
    assert {v for _, v in load.answers} <= {"1", good}
    assert Registry(root).resolve("tiny", "production").version == good
    actions = [(d["action"], d["step"]) for d in promoted["decisions"]]
    assert actions == [("start", 0), ("advance", 0), ("promote", 1)], actions
    notes = [e["note"] for e in Registry(root).alias_journal("tiny") if "note" in e]
    decided = [(n.get("candidate"), n.get("action")) for n in notes if "action" in n]
    assert (bad, "rollback") in decided and (good, "promote") in decided
    promote_note = next(n for n in notes if n.get("action") == "promote")
    assert promote_note["evidence"]["candidate"]["images"] >= 30


@pytest.mark.slow
def test_two_workers_follow_a_rollout_and_a_promote_before_the_call_returns(
    served_registry, tmp_path, test_images
):
    """SEEDNET_WORKERS=2: a rollout started through one worker is applied by both before
    the call returns (each worker's revision, on /models); so is a promote: every answer
    after it returns comes from the new version, whichever worker takes the connection."""
    from tests.service.test_main import ready
    from tests.service.test_main import start as start_process

    root = copy_of(served_registry, tmp_path)
    proc, url = start_process(
        {
            "SEEDNET_REGISTRY_ROOT": str(root),
            "SEEDNET_MODEL_NAME": "tiny",
            "SEEDNET_DEVICE": "cpu",
            "SEEDNET_WORKERS": "2",
            "SEEDNET_BACKEND": "torchscript",
            "SEEDNET_ADMIN_TOKEN": ADMIN_TOKEN,
            "SEEDNET_ACCESS_LOG": "false",
            "SEEDNET_EXPLAIN": "off",
        }
    )

    def predict_versions(n: int) -> list[str]:
        out = []
        for i in range(n):  # a new connection each: spread over the workers
            r = httpx.post(f"{url}/predict", files={"file": ("x.jpg", test_images[i][1])})
            assert r.status_code == 200, r.text
            out.append(r.json()["model"]["version"])
        return out

    try:
        wait_until(lambda: ready(proc, url), 300, 0.1, "the service to be ready")
        wait_until(
            lambda: len(httpx.get(f"{url}/models").json()["workers"]) == 2, 120, 0.2, "workers"
        )
        r = start(url, "2", [{"mode": "canary", "percent": 50}], {"min_samples": 10**9})
        assert r.status_code == 200, r.text
        started = r.json()
        listing = httpx.get(f"{url}/models").json()
        r = httpx.post(
            f"{url}/models/tiny/rollout/abort", json={"reason": "test"}, headers=ADMIN, timeout=120
        )
        assert r.status_code == 200, r.text
        aborted = r.json()
        after_abort = predict_versions(30)
        r = httpx.post(
            f"{url}/models/tiny/promote", json={"version": "2"}, headers=ADMIN, timeout=120
        )
        assert r.status_code == 200, r.text
        promoted = r.json()
        after_promote = predict_versions(30)
        workers = httpx.get(f"{url}/models").json()["workers"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert started["converged"] is True and len(started["workers"]) == 2, started
    revision = started["revision"]
    assert all(w["revision"] >= revision for w in started["workers"])
    assert listing["rollout"]["state"] == "running" and listing["rollout"]["candidate"] == "2"
    assert all(w["rollout"]["candidate"] == "2" for w in listing["workers"]), listing["workers"]
    assert aborted["converged"] is True and aborted["rollout"]["state"] == "aborted"
    assert set(after_abort) == {"1"}
    assert promoted["converged"] is True and {w["version"] for w in promoted["workers"]} == {"2"}
    assert set(after_promote) == {"2"}, Counter(after_promote)
    assert len(workers) == 2 and {w["version"] for w in workers} == {"2"}, out


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"candidate": "9", "steps": [{"mode": "canary", "percent": 10}]}, 404, "9"),
        ({"candidate": "2", "steps": []}, 422, "at least one step"),
        ({"candidate": "2", "steps": [{"mode": "canary", "percent": 100}]}, 422, "percent"),
        ({"candidate": "2", "steps": [{"mode": "mirror", "percent": 10}]}, 422, "mode"),
        ({"candidate": "2", "steps": [{"mode": "canary", "percent": 10}], "rule": {"x": 1}},
         422, "unknown field"),
        ({"candidate": "2", "steps": [{"mode": "canary", "percent": 10}],
          "rule": {"min_agreement": 2}}, 422, "min_agreement"),
        ({"candidate": "1", "steps": [{"mode": "canary", "percent": 10}]}, 409, ""),
    ],
)  # fmt: skip
def test_every_invalid_rollout_request_is_a_clear_4xx_and_changes_nothing(
    server, served_registry, body, status, message
):
    before = Registry(served_registry).rollout_state("tiny").revision
    r = httpx.post(f"{server.url}/models/tiny/rollout", json=body, headers=ADMIN, timeout=60)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    assert Registry(served_registry).rollout_state("tiny").revision == before
    assert httpx.post(f"{server.url}/models/tiny/rollout", json=body).status_code == 401
    r = httpx.post(f"{server.url}/models/tiny/rollout/abort", json={}, headers=ADMIN)
    assert r.status_code == 409 and "nothing to abort" in r.json()["error"]["message"]


@pytest.mark.slow
def test_a_canary_without_a_calibrated_output_leaves_those_requests_to_stable(calibrated, tmp_path):
    """Stable is calibrated (tiny@3: ood_score among its default protocol outputs), the
    candidate is not (tiny@2): a /v2 request that names no outputs needs ood_score, so
    stable answers it whatever the canary share; one that names probabilities only may
    get the candidate. No request fails."""
    registry, first, _ = calibrated
    assert first.returncode == 0, first.stdout + first.stderr
    root = tmp_path / "registry"
    shutil.copytree(registry.root, root)
    Registry(root).set_alias("tiny", "production", "3")
    pixels = np.random.default_rng(0).integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    images = {"name": "images", "shape": [1, 3, 32, 32], "datatype": "UINT8",
              "data": pixels.ravel().tolist()}  # fmt: skip
    with serve(root) as srv:
        r = start(srv.url, "2", [{"mode": "canary", "percent": 90}], {"min_samples": 10**9})
        assert r.status_code == 200, r.text
        answers = []
        for outputs in ([], [{"name": "probabilities"}]):
            for i in range(30):
                body = {"inputs": [images], "outputs": outputs}
                r = httpx.post(
                    f"{srv.url}/v2/models/tiny/infer",
                    json=body,
                    headers={"x-client-key": f"c{i}"},
                    timeout=60,
                )
                assert r.status_code == 200, r.text
                names = {o["name"] for o in r.json()["outputs"]}
                answers.append((bool(outputs), r.json()["model_version"], names))
    default = [(v, names) for named, v, names in answers if not named]
    assert {v for v, _ in default} == {"3"} and all("ood_score" in n for _, n in default)
    assert "2" in {v for named, v, _ in answers if named}  # 90 %: the candidate answers
