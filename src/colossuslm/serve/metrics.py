"""Server metrics in the Prometheus text exposition format (counters, gauges, histograms).

Small enough to own rather than add a dependency; names follow Prometheus conventions
(`_total` counters, `_seconds` histograms). Updated from the event loop only, so no locks.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Labels = tuple[tuple[str, str], ...]


def _number(value: float) -> str:
    """A sample value at full precision (`:g` keeps 6 digits: 1234567 tokens would read 1.23457e+06)."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def _format_labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{key}="{value}"' for key, value in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Counter:
    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_format_labels(k)} {_number(v)}" for k, v in sorted(self.values.items())]
        return lines


class Gauge:
    """Read at scrape time from a callback, so it is never stale (`kind="counter"` for totals)."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float], kind: str = "gauge"):
        self.name, self.help, self.read, self.kind = name, help_text, read, kind

    def render(self) -> list[str]:
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} {self.kind}",
            f"{self.name} {_number(self.read())}",
        ]


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines += [f"{self.name}_sum {_number(self.total)}", f"{self.name}_count {self.count}"]
        return lines


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], object]):
        self.requests = Counter("colossus_requests_total", "HTTP requests by endpoint and status code.")
        self.prompt_tokens = Counter("colossus_prompt_tokens_total", "Prompt tokens processed.")
        self.generation_tokens = Counter("colossus_generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram("colossus_time_to_first_token_seconds", "Time from request to first generated token.")
        self.latency = Histogram("colossus_request_latency_seconds", "Time from request to its last token.")
        self.gauges = [
            Gauge("colossus_requests_running", "Requests in the running batch.", lambda: engine_stats().running),
            Gauge("colossus_requests_waiting", "Requests queued for a batch slot.", lambda: engine_stats().waiting),
            Gauge(
                "colossus_kv_cache_usage_ratio",
                "Fraction of KV-cache blocks in use.",
                lambda: engine_stats().kv_cache_usage,
            ),
            Gauge(
                "colossus_preemptions_total",
                "Requests preempted because the KV cache was full.",
                lambda: engine_stats().preemptions,
                kind="counter",
            ),
            # As vLLM's prefix_cache_queries / prefix_cache_hits: the hit rate over any window is
            # rate(hits) / rate(queries); the gauge below is the rate since the server started.
            Gauge(
                "colossus_prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
                lambda: engine_stats().prefix_cache_queries,
                kind="counter",
            ),
            Gauge(
                "colossus_prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache (not computed again).",
                lambda: engine_stats().prefix_cache_hits,
                kind="counter",
            ),
            Gauge(
                "colossus_prefix_cache_hit_rate",
                "Prefix-cache hits over queries, in tokens, since the start (0 before any query).",
                lambda: _hit_rate(engine_stats()),
            ),
            Gauge(
                "colossus_prompt_tokens_computed_total",
                "Prompt tokens run through the model (prompt tokens minus cache hits, plus recomputes).",
                lambda: engine_stats().prompt_tokens_computed,
                kind="counter",
            ),
            *_speculative_gauges(engine_stats),
        ]

    def render(self) -> str:
        lines: list[str] = []
        for metric in (
            self.requests,
            self.prompt_tokens,
            self.generation_tokens,
            self.ttft,
            self.latency,
            *self.gauges,
        ):
            lines += metric.render()
        return "\n".join(lines) + "\n"


def _hit_rate(stats) -> float:
    return stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0


def _speculative_gauges(engine_stats: Callable[[], object]) -> list[Gauge]:
    """Speculative decoding, as vLLM's spec_decode_* metrics (all 0 while it is off)."""

    def ratio(num: str, den: str) -> Callable[[], float]:
        def read() -> float:
            stats = engine_stats()
            return getattr(stats, num) / getattr(stats, den) if getattr(stats, den) else 0.0

        return read

    return [
        Gauge(
            "colossus_spec_decode_num_drafts_total",
            "Draft spans verified (one per speculating request per step).",
            lambda: engine_stats().spec_num_drafts,
            kind="counter",
        ),
        Gauge(
            "colossus_spec_decode_num_draft_tokens_total",
            "Draft tokens proposed and verified.",
            lambda: engine_stats().spec_draft_tokens,
            kind="counter",
        ),
        Gauge(
            "colossus_spec_decode_num_accepted_tokens_total",
            "Draft tokens accepted.",
            lambda: engine_stats().spec_accepted_tokens,
            kind="counter",
        ),
        Gauge(
            "colossus_spec_decode_propose_seconds_total",
            "Wall time spent proposing drafts (a draft model's forwards, or prompt lookup): the cost "
            "that accepted drafts must repay.",
            lambda: engine_stats().spec_propose_seconds,
            kind="counter",
        ),
        Gauge(
            "colossus_spec_decode_acceptance_rate",
            "Accepted over proposed draft tokens since the start (0 before any).",
            ratio("spec_accepted_tokens", "spec_draft_tokens"),
        ),
        Gauge(
            "colossus_spec_decode_mean_accepted_length",
            "Draft tokens accepted per verification span, on average since the start.",
            ratio("spec_accepted_tokens", "spec_num_drafts"),
        ),
    ]


__all__ = ["Counter", "Gauge", "Histogram", "ServerMetrics"]
