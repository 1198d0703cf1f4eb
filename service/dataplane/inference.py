"""The one inference path: image files or pixels in, the model's outputs out.

Every front end (the JSON API's ``/predict``, the inference protocol over REST and over
gRPC) parses its wire format into files or pixels, calls :meth:`DataPlane.infer`, and
renders what comes back; none touches the decode pool or the batcher. So every protocol
gets the same decoding (limits, errors, the bounded fair pool and the per-request pixel
budget), the same batches and admission control, and the same stage metrics, labelled
with the protocol::

    files  -> decode pool (headers, budget, decode, resize) --+
    pixels ---------------------------------------------------+-> batcher -> model thread
                                                                       -> outputs by name

Stages (``seednet_stage_seconds{stage, protocol}``): ``read_body`` and ``parse`` (the
front end's, reported through :meth:`DataPlane.observe`), ``decode``, ``queue_wait``,
``model``, then ``serialise`` (the front end's again).

While a rollout runs, :attr:`DataPlane.split` says how requests are shared with its
candidate (``service.dataplane.traffic``): a request's :class:`Route` may pin a version
or carry a client key. Every answer is counted for the version that gave it; a canary
answer that fails or is not finite is counted against the candidate and the request is
answered by the serving model instead; a shadow share of stable's answers is offered
to the shadow lane (``service.dataplane.shadow``) after the answer is ready.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from seednet.graph import out_of_distribution
from service.dataplane.backends import Outputs
from service.dataplane.batching import Batcher
from service.dataplane.decoding import DecodePool, decode_files
from service.dataplane.images import ImageFile, ImageLimits, PreparedImage
from service.dataplane.served import ServingModel
from service.dataplane.shadow import ShadowLane
from service.dataplane.traffic import NO_ROUTE, NO_SPLIT, Route, Split, pinned_model
from service.errors import BadRequest, ServiceError
from service.metrics import Metrics

#: What the model takes: uint8 RGB images at the model's resolution, channels first.
PIXEL_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class Inference:
    """One request's answer: every output's rows, the model that computed them, and the
    decoded images (files only: their original size and the 32x32 input the model saw)."""

    outputs: Outputs
    model: ServingModel
    images: list[PreparedImage] | None = None


class DataPlane:
    """Decode, batch, run: what every front end calls (see the module docstring)."""

    def __init__(
        self,
        batcher: Batcher,
        decoder: DecodePool,
        limits: ImageLimits,
        metrics: Metrics,
        current_model: Callable[[], ServingModel],
    ) -> None:
        self.batcher = batcher
        self.decoder = decoder
        self.limits = limits
        self.metrics = metrics
        self.current_model = current_model
        #: Set by the rollout (service.lifecycle.rollout); read once per request.
        self.split: Split = NO_SPLIT
        self.shadow: ShadowLane | None = None

    async def admit(self) -> None:
        """Admission before a body is read: wait (nothing read or decoded) until one more
        image could start within the deadline, else 429: an overloaded service spends
        nothing on requests it refuses, and the wait keeps refused clients from coming
        straight back."""
        await self.batcher.wait_for_room(1)

    def observe(self, stage: str, protocol: str, seconds: float) -> None:
        """A front end's own stage (``read_body``, ``parse``, ``serialise``)."""
        self.metrics.observe_stage(stage, protocol, seconds)

    async def decode(
        self, files: Sequence[ImageFile], protocol: str, admitted: bool = False
    ) -> list[PreparedImage]:
        """Uploads as model inputs, on the decode pool, within the request's limits (the
        ``decode`` stage); what :meth:`infer` does with files, for other consumers of
        the images (explanations). ``admitted``: images bound for the model queue, counted
        by admission while their pixels are decoded."""
        t0 = time.perf_counter()
        hold = self.batcher.preparing if admitted else None
        images = await decode_files(self.decoder, files, self.limits, hold=hold)
        self.metrics.observe_stage("decode", protocol, time.perf_counter() - t0)
        return images

    async def infer(
        self,
        *,
        protocol: str,
        files: Sequence[ImageFile] | None = None,
        pixels: np.ndarray | None = None,
        model: ServingModel | None = None,
        route: Route = NO_ROUTE,
    ) -> Inference:
        """The outputs for ``files`` (decoded as uploads) or ``pixels`` (uint8
        ``[N, 3, 32, 32]``), exactly one of them; ``model`` pins a model (None: the one
        serving when the batch runs, or the rollout's ``route``, see the module
        docstring). Raises the service's errors (``service.errors``)."""
        if (files is None) == (pixels is None):
            raise ValueError("give exactly one of files, pixels")
        serving = self.current_model()  # 503 while none is loaded, before any work is done
        split = self.split
        if model is None and route.pin is not None:
            model = pinned_model(route.pin, serving, split)  # 400 before decoding
        canary = model is None and split.canary(route)
        images = None
        if files is not None:
            self.batcher.admit(len(files))  # 429 before decoding what cannot start in time
            images = await self.decode(files, protocol, admitted=True)
            pixels = np.stack([p.array for p in images])
        assert pixels is not None
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != PIXEL_SHAPE:
            raise BadRequest(
                f"pixels must be uint8 [N, {', '.join(map(str, PIXEL_SHAPE))}], "
                f"got {pixels.dtype} {list(pixels.shape)}"
            )
        pixels = np.ascontiguousarray(pixels)
        if canary:
            result = await self._canary(pixels, split)
        else:
            result = await self._run(pixels, model, serving)
        self.metrics.observe_stage("queue_wait", protocol, result.queue_wait)
        self.metrics.observe_stage("model", protocol, result.model_seconds)
        outputs = with_ood_flag(result.outputs, result.model)
        self.metrics.on_answers(result.model.version.version, outputs)
        probabilities = outputs.get("probabilities")
        if probabilities is not None:
            self.metrics.on_version_answer(
                result.model.info, "live", probabilities, result.model_seconds
            )
            candidate = split.candidate
            by_stable = candidate is not None and result.model is not candidate
            if by_stable and self.shadow is not None and split.shadow():
                self.shadow.offer(pixels, probabilities, result.model, candidate)
        return Inference(outputs, result.model, images)

    async def _run(self, pixels: np.ndarray, model: ServingModel | None, serving: ServingModel):
        """Through the batcher; a failed forward pass is counted for its version."""
        try:
            return await self.batcher.submit(pixels, model)
        except ServiceError:
            raise  # admission control, deadlines: the load, not the version
        except Exception:
            self.metrics.on_version_error((model or serving).info, "live")
            raise

    async def _canary(self, pixels: np.ndarray, split: Split):
        """The candidate's answer; if it fails or is not finite, the serving model's (the
        client never sees a canary fail; the candidate's evidence does)."""
        candidate = split.candidate
        assert candidate is not None
        try:
            result = await self.batcher.submit(pixels, candidate)
        except ServiceError:
            raise
        except Exception:
            result = None
        probabilities = None if result is None else result.outputs.get("probabilities")
        if probabilities is not None and np.isfinite(probabilities).all():
            return result
        self.metrics.on_version_error(candidate.info, "live")
        return await self._run(pixels, None, self.current_model())


def with_ood_flag(outputs: Outputs, model: ServingModel) -> Outputs:
    """``out_of_distribution`` (bool per image) beside a calibrated graph's ``ood_score``,
    at the threshold published with the version; outputs unchanged for other versions."""
    threshold = model.ood_threshold
    if threshold is None or "ood_score" not in outputs:
        return outputs
    return {**outputs, "out_of_distribution": out_of_distribution(outputs["ood_score"], threshold)}
