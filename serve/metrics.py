"""A few Prometheus metrics in the text exposition format (no client library needed)."""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.batch_sizes: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.gauges: dict[str, float] = {}

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1
            b = next((i for i, edge in enumerate(BUCKETS) if seconds <= edge), len(BUCKETS))
            self.latency[endpoint][b] += 1
            self.latency_sum[endpoint] += seconds

    def batch(self, encoder: str, size: int) -> None:
        with self.lock:
            self.batch_sizes[encoder][size] += 1

    def render(self) -> str:
        out = ["# HELP dsmd_requests_total HTTP requests by endpoint and status.", "# TYPE dsmd_requests_total counter"]
        with self.lock:
            for (ep, st), n in sorted(self.requests.items()):
                out.append(f'dsmd_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            out += ["# HELP dsmd_request_seconds Request latency.", "# TYPE dsmd_request_seconds histogram"]
            for ep, counts in sorted(self.latency.items()):
                total = 0
                for edge, c in zip(list(BUCKETS) + ["+Inf"], counts):
                    total += c
                    out.append(f'dsmd_request_seconds_bucket{{endpoint="{ep}",le="{edge}"}} {total}')
                out.append(f'dsmd_request_seconds_count{{endpoint="{ep}"}} {total}')
                out.append(f'dsmd_request_seconds_sum{{endpoint="{ep}"}} {self.latency_sum[ep]:.6f}')
            out += ["# HELP dsmd_encoder_batch_size_total Encoder calls by batch size.",
                    "# TYPE dsmd_encoder_batch_size_total counter"]
            for enc, sizes in sorted(self.batch_sizes.items()):
                for size, n in sorted(sizes.items()):
                    out.append(f'dsmd_encoder_batch_size_total{{encoder="{enc}",size="{size}"}} {n}')
            for name, value in sorted(self.gauges.items()):
                out += [f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(out) + "\n"
