"""Counters, gauges and histograms of the server, rendered in Prometheus' text exposition format (version 0.0.4).

Written here rather than taken from prometheus_client: the server needs a dozen series, thread-safe updates and one
text rendering, which is less code than adapting a dependency.
"""

from __future__ import annotations

import bisect
import math
import threading

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip((*self.buckets, math.inf), self.counts):
            total += count
            le = "+Inf" if bound == math.inf else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {total}"]


class Metrics:
    """The server's series. Counters only grow; gauges are read from callables when /metrics is rendered."""

    COUNTERS = {
        "lorakit_requests_total": "Requests finished, by outcome (ok, error).",
        "lorakit_prompt_tokens_total": "Prompt tokens of finished rows.",
        "lorakit_generation_tokens_total": "Tokens generated.",
        "lorakit_steps_total": "Engine steps (forward passes over the running batch).",
        "lorakit_adapter_cache_hits_total": "Requests whose adapter was already resident.",
        "lorakit_adapter_cache_misses_total": "Requests whose adapter was loaded on demand.",
        "lorakit_adapter_cache_evictions_total": "Adapters evicted from the cache to make room.",
    }
    HISTOGRAMS = {
        "lorakit_time_to_first_token_seconds": ("From arrival to the first generated token.", TTFT_BUCKETS),
        "lorakit_time_per_output_token_seconds": ("Between consecutive tokens of a row.", TPOT_BUCKETS),
        "lorakit_batch_occupancy_rows": ("Rows decoded per engine step.", (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)),
    }

    def __init__(self):
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, str], float] = {}
        self.histograms = {name: Histogram(buckets) for name, (_, buckets) in self.HISTOGRAMS.items()}
        self.gauges: dict[str, tuple[str, object]] = {}  # name -> (help, callable returning a number)

    def inc(self, name: str, value: float = 1, label: str = "") -> None:
        assert name in self.COUNTERS, name
        with self.lock:
            self.counters[name, label] = self.counters.get((name, label), 0) + value

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            self.histograms[name].observe(value)

    def gauge(self, name: str, help_text: str, read) -> None:
        self.gauges[name] = (help_text, read)

    def value(self, name: str, label: str = "") -> float:
        return self.counters.get((name, label), 0)

    def render(self) -> str:
        lines = []
        with self.lock:
            for name, help_text in self.COUNTERS.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
                labelled = sorted((label, v) for (n, label), v in self.counters.items() if n == name)
                for label, v in labelled or [("", 0)]:
                    lines.append(f"{name}{'{' + label + '}' if label else ''} {v:g}")
            for name, (help_text, _) in self.HISTOGRAMS.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *self.histograms[name].lines(name)]
        for name, (help_text, read) in self.gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {float(read()):g}"]
        return "\n".join(lines) + "\n"
