"""A small, thread-safe Prometheus text exposition (counters and histograms) for the service.

Kept dependency-free: the service needs three metric families, not a client library.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels
    )
    return "{" + inner + "}"


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1


class ServiceMetrics:
    """requests_total{path,method,status}, request latency (seconds) and predict batch sizes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple, int] = defaultdict(int)
        self._latency: dict[tuple, _Histogram] = {}
        self._batch = _Histogram(BATCH_BUCKETS)
        self._reloads: dict[tuple, int] = defaultdict(int)

    def request(self, path: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(("path", path), ("method", method), ("status", str(status)))] += 1
            key = (("path", path),)
            if key not in self._latency:
                self._latency[key] = _Histogram(LATENCY_BUCKETS)
            self._latency[key].observe(seconds)

    def batch(self, size: int) -> None:
        with self._lock:
            self._batch.observe(size)

    def reload(self, ok: bool) -> None:
        with self._lock:
            self._reloads[(("result", "ok" if ok else "error"),)] += 1

    def render(self, model_version: str | None) -> str:
        lines = []
        with self._lock:
            lines += [
                "# HELP pep_requests_total HTTP requests by path, method and status.",
                "# TYPE pep_requests_total counter",
            ]
            lines += [f"pep_requests_total{_labels(k)} {v}" for k, v in sorted(self._requests.items())]
            lines += [
                "# HELP pep_request_latency_seconds Request latency.",
                "# TYPE pep_request_latency_seconds histogram",
            ]
            for key, h in sorted(self._latency.items()):
                lines += self._histogram("pep_request_latency_seconds", key, h)
            lines += [
                "# HELP pep_predict_batch_size Instances per predict request.",
                "# TYPE pep_predict_batch_size histogram",
            ]
            lines += self._histogram("pep_predict_batch_size", (), self._batch)
            lines += ["# HELP pep_reloads_total Model reloads by result.", "# TYPE pep_reloads_total counter"]
            lines += [f"pep_reloads_total{_labels(k)} {v}" for k, v in sorted(self._reloads.items())]
        lines += [
            "# HELP pep_model_info The model version being served.",
            "# TYPE pep_model_info gauge",
            f"pep_model_info{_labels((('version', model_version or ''),))} {1 if model_version else 0}",
        ]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _histogram(name: str, key: tuple, h: _Histogram) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip((*h.buckets, float("inf")), h.counts):
            cumulative += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f"{name}_bucket{_labels((*key, ('le', le)))} {cumulative}")
        out.append(f"{name}_sum{_labels(key)} {h.total:.6f}")
        out.append(f"{name}_count{_labels(key)} {h.n}")
        return out
