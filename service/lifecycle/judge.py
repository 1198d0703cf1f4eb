"""A rollout step's evidence, read from the metrics, and the rule's verdict on it.

The evidence is what ``/metrics`` shows (``service.metrics``: per-version requests,
errors, model time and confidence, the shadow comparisons), summed over this host's
worker processes, counted from the moment this process saw the step begin
(:meth:`Counts.minus` of a baseline). Pure functions: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from registry.rollouts import Rule, Step

#: Disagreement pairs kept in a decision's evidence (the most frequent).
TOP_PAIRS = 10


@dataclass
class Tally:
    """One version's live or shadow numbers."""

    requests: float = 0.0
    errors: float = 0.0
    images: float = 0.0
    confidence_sum: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count

    def minus(self, base: Tally) -> Tally:
        return Tally(
            self.requests - base.requests,
            self.errors - base.errors,
            self.images - base.images,
            self.confidence_sum - base.confidence_sum,
            {le: n - base.buckets.get(le, 0.0) for le, n in self.buckets.items()},
        )

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def quantile(self, q: float) -> float | None:
        """As PromQL's histogram_quantile: linear within the bucket the rank falls in."""
        if not self.buckets:
            return None
        bounds = sorted(self.buckets.items())
        total = bounds[-1][1]
        if total <= 0:
            return None
        rank = q * total
        low, below = 0.0, 0.0
        for le, count in bounds:
            if count >= rank:
                if math.isinf(le):
                    return low
                if count == below:
                    return le
                return low + (le - low) * (rank - below) / (count - below)
            low, below = le, count
        return low

    def summary(self, version: str) -> dict:
        p99 = self.quantile(0.99)
        rate = self.error_rate
        return {
            "version": version,
            "requests": int(self.requests),
            "images": int(self.images),
            "errors": int(self.errors),
            "error_rate": None if rate is None else round(rate, 6),
            "p99_model_s": None if p99 is None else round(p99, 6),
            "mean_confidence": (
                round(self.confidence_sum / self.images, 4) if self.images else None
            ),
        }


@dataclass
class Counts:
    """Every number of one model's rollout evidence, as cumulative totals."""

    tallies: dict[tuple[str, str], Tally] = field(default_factory=dict)  # (version, traffic)
    compared: float = 0.0
    agreed: float = 0.0
    change_sum: float = 0.0
    pairs: dict[tuple[str, str], float] = field(default_factory=dict)
    dropped: float = 0.0

    def tally(self, version: str, traffic: str) -> Tally:
        return self.tallies.get((version, traffic), Tally())

    def minus(self, base: Counts) -> Counts:
        return Counts(
            {k: t.minus(base.tally(*k)) for k, t in self.tallies.items()},
            self.compared - base.compared,
            self.agreed - base.agreed,
            self.change_sum - base.change_sum,
            {k: n - base.pairs.get(k, 0.0) for k, n in self.pairs.items()},
            self.dropped - base.dropped,
        )

    def shadow_summary(self) -> dict:
        pairs = sorted(((n, k) for k, n in self.pairs.items() if n > 0), reverse=True)
        return {
            "compared": int(self.compared),
            "agreement": round(self.agreed / self.compared, 4) if self.compared else None,
            "mean_abs_probability_change": (
                round(self.change_sum / self.compared, 4) if self.compared else None
            ),
            "disagreements": [
                {"stable": a, "candidate": b, "count": int(n)} for n, (a, b) in pairs[:TOP_PAIRS]
            ],
            "dropped": int(self.dropped),
        }


def read_counts(samples: Iterable, name: str, stable: str, candidate: str) -> Counts:
    """The evidence of ``name``'s ``stable`` and ``candidate`` versions in ``samples``
    (prometheus_client samples: ``name``, ``labels``, ``value``)."""
    counts = Counts()
    wanted = {stable, candidate}
    for s in samples:
        labels = s.labels
        if s.name == "seednet_shadow_dropped_total":
            counts.dropped += s.value
            continue
        if labels.get("name") != name:
            continue
        if s.name.startswith("seednet_version_"):
            version = labels.get("version")
            if version not in wanted:
                continue
            tally = counts.tallies.setdefault((version, labels["traffic"]), Tally())
            if s.name == "seednet_version_requests_total":
                tally.requests += s.value
            elif s.name == "seednet_version_errors_total":
                tally.errors += s.value
            elif s.name == "seednet_version_confidence_count":
                tally.images += s.value
            elif s.name == "seednet_version_confidence_sum":
                tally.confidence_sum += s.value
            elif s.name == "seednet_version_model_seconds_bucket":
                le = float(labels["le"])
                tally.buckets[le] = tally.buckets.get(le, 0.0) + s.value
            continue
        if (labels.get("stable"), labels.get("candidate")) != (stable, candidate):
            continue
        if s.name == "seednet_shadow_compared_total":
            counts.compared += s.value
        elif s.name == "seednet_shadow_agreed_total":
            counts.agreed += s.value
        elif s.name == "seednet_shadow_probability_change_total":
            counts.change_sum += s.value
        elif s.name == "seednet_shadow_disagreements_total":
            key = (labels["stable_label"], labels["candidate_label"])
            counts.pairs[key] = counts.pairs.get(key, 0.0) + s.value
    return counts


@dataclass(frozen=True)
class Verdict:
    """``wait`` (too few samples yet), ``pass`` or ``fail``, why, and the evidence."""

    outcome: str
    reason: str
    evidence: dict


def evidence_of(
    step: Step, counts: Counts, stable: str, candidate: str, seconds: float
) -> tuple[float, Tally, Tally, dict]:
    """(samples, stable's tally, the candidate's tally, the evidence as JSON data)."""
    live = counts.tally(stable, "live")
    if step.mode == "shadow":
        theirs, samples = counts.tally(candidate, "shadow"), counts.compared
    else:
        theirs = counts.tally(candidate, "live")
        samples = theirs.images
    evidence = {
        "step": str(step),
        "seconds": round(seconds, 1),
        "samples": int(samples),
        "stable": live.summary(stable),
        "candidate": theirs.summary(candidate),
    }
    if step.mode == "shadow" or counts.compared:
        evidence["shadow"] = counts.shadow_summary()
    return samples, live, theirs, evidence


def judge(
    rule: Rule, step: Step, counts: Counts, stable: str, candidate: str, seconds: float
) -> Verdict:
    """The rule's verdict on one step's evidence (see :class:`registry.rollouts.Rule`)."""
    samples, live, theirs, evidence = evidence_of(step, counts, stable, candidate, seconds)
    evidence["rule"] = rule.to_dict()
    if samples < rule.min_samples:
        if rule.max_step_s is not None and seconds > rule.max_step_s:
            return Verdict(
                "fail",
                f"{step}: only {int(samples)} of {rule.min_samples} samples after "
                f"{seconds:.0f} s (max_step_s {rule.max_step_s:g})",
                evidence,
            )
        return Verdict("wait", f"{int(samples)} of {rule.min_samples} samples", evidence)
    failures, passed = [], []
    ours, base = theirs.error_rate or 0.0, live.error_rate or 0.0
    increase = ours - base
    evidence["error_rate_increase"] = round(increase, 6)
    (failures if increase > rule.max_error_rate_increase else passed).append(
        f"error rate {ours:.4f} vs {base:.4f} (max +{rule.max_error_rate_increase:g})"
    )
    p99_stable, p99_candidate = live.quantile(0.99), theirs.quantile(0.99)
    if p99_stable and p99_candidate is not None:
        ratio = p99_candidate / p99_stable
        evidence["p99_ratio"] = round(ratio, 4)
        # Shadow runs are merged into the largest batches the lane can make, while live
        # requests run in whatever batches the load makes: their times are not alike, so
        # latency is judged where the candidate answers live requests (canary steps).
        if step.mode == "canary":
            (failures if ratio > rule.max_p99_ratio else passed).append(
                f"p99 model time x{ratio:.2f} (max x{rule.max_p99_ratio:g})"
            )
    if step.mode == "shadow":
        agreement = counts.agreed / counts.compared if counts.compared else 0.0
        (failures if agreement < rule.min_agreement else passed).append(
            f"top-1 agreement {agreement:.3f} (min {rule.min_agreement:g})"
        )
    over = f"{step}, {int(samples)} samples"
    if failures:
        return Verdict("fail", f"{over}: " + "; ".join(failures), evidence)
    return Verdict("pass", f"{over}: " + "; ".join(passed), evidence)
