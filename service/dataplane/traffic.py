"""Which loaded version answers a request while a rollout runs: the split and the pin.

A rollout (``service.lifecycle.rollout``) loads its candidate beside the serving model
and hands the data plane a :class:`Split`; every request then goes one of three ways:

- pinned: the request names a version (the ``X-Model-Version`` header, the inference
  protocol's model version): that one answers, if it is loaded (else 400);
- canary: with a client key (``X-Client-Key``) the candidate answers when the key's hash
  falls in the canary share, so one client stays on one version for the whole rollout
  (and a share that grows keeps those it had); without one, a random draw per request;
- otherwise the serving (stable) model answers, and in a shadow step a random share of
  those requests is also run on the candidate, off the request path
  (``service.dataplane.shadow``).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from service.dataplane.served import ServingModel
from service.errors import ModelNotServed

#: Hash buckets of a client key: canary shares are honoured to 0.01 %.
BUCKETS = 10_000


@dataclass(frozen=True)
class Route:
    """What a request asked for: a version (``pin``), a client key (``key``) and the
    outputs its answer must hold (``outputs``; empty: whatever the model returns)."""

    pin: str | None = None
    key: str | None = None
    outputs: tuple[str, ...] = ()


NO_ROUTE = Route()


@dataclass(frozen=True)
class Split:
    """How requests are shared between the serving model and a rollout's candidate.

    ``mode``: ``shadow``, ``canary`` or ``off`` (the candidate is loaded, e.g. while its
    check set is evaluated, but gets no traffic: only pinned requests). ``salt``: the
    rollout's id, so each rollout draws its own cohort of client keys.
    """

    candidate: ServingModel | None = None
    mode: str = "off"
    percent: float = 0.0
    salt: str = ""

    def canary(self, route: Route) -> bool:
        """Whether the candidate answers a request with this route: its client key's draw
        (random without one), and only if the candidate returns every output the request
        needs (the protocol fixes them from the serving version's signature: a calibrated
        stable's ``ood_score`` that an uncalibrated candidate lacks is answered by stable)."""
        candidate = self.candidate
        if candidate is None or self.mode != "canary":
            return False
        if route.outputs and not set(route.outputs) <= produced(candidate):
            return False
        return _draw(route.key, self.salt) < self.percent / 100

    def shadow(self) -> bool:
        """Whether to also run a request answered by stable on the candidate."""
        if self.candidate is None or self.mode != "shadow":
            return False
        return random.random() < self.percent / 100


NO_SPLIT = Split()


def produced(model: ServingModel) -> set[str]:
    """The outputs an answer of ``model`` holds (the data plane adds the OOD flag)."""
    names = set(model.output_dims)
    if model.ood_threshold is not None:
        names.add("out_of_distribution")
    return names


def _draw(key: str | None, salt: str) -> float:
    """A number in [0, 1): the same for the same key and rollout, random without a key."""
    if key is None:
        return random.random()
    digest = hashlib.blake2b(f"{salt}\0{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") % BUCKETS) / BUCKETS


def pinned_model(pin: str, serving: ServingModel, split: Split) -> ServingModel:
    """The loaded model of version ``pin``; ModelNotServed (400) naming those loaded."""
    if pin == serving.info["version"]:
        return serving
    candidate = split.candidate
    if candidate is not None and pin == candidate.info["version"]:
        return candidate
    loaded = f"{serving.info['version']} (serving)"
    if candidate is not None:
        loaded += f" and {candidate.info['version']} (a rollout's candidate)"
    raise ModelNotServed(
        f"{serving.info['name']!r} version {pin!r} is not loaded here; the loaded versions "
        f"are {loaded}"
    )
