"""Counters, histograms and scrape-time gauges with fixed label names: plain dicts keyed by the
tuple of label values, so that recording is one dict lookup and an add (histograms: a bisect too).

A family renders itself as samples `(suffix, label values, value)`; exposition.py writes them.
Series are never removed: their label values come from configs, so their number is bounded by the
deployments and keys a process has served (gauges of the present are built anew at each scrape).
"""

from __future__ import annotations

import bisect
import math
from typing import Iterable, Iterator, Literal

Kind = Literal["counter", "gauge", "histogram"]
Sample = tuple[str, tuple[str, ...], tuple[str, ...], float]   # suffix, label names, values, value


class Family:
    __slots__ = ("name", "help", "labels", "kind")

    def __init__(self, name: str, help: str, labels: tuple[str, ...], kind: Kind) -> None:
        self.name = name
        self.help = help
        self.labels = labels
        self.kind = kind

    def samples(self) -> Iterator[Sample]:
        raise NotImplementedError


class Counter(Family):
    """A monotonic count. Named without `_total`: the exposition adds it (OpenMetrics wants the
    family without it, the samples with it)."""

    __slots__ = ("values",)

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        super().__init__(name, help, labels, "counter")
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...] = (), amount: float = 1.0) -> None:
        values = self.values
        values[key] = values.get(key, 0.0) + amount

    def samples(self) -> Iterator[Sample]:
        for key, value in self.values.items():
            yield "_total", self.labels, key, value


class Gauge(Family):
    """A value of the present: set at scrape time from whoever owns it (collect.py)."""

    __slots__ = ("values",)

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (),
                 values: Iterable[tuple[tuple[str, ...], float]] = ()) -> None:
        super().__init__(name, help, labels, "gauge")
        self.values: dict[tuple[str, ...], float] = dict(values)

    def set(self, key: tuple[str, ...], value: float) -> None:
        self.values[key] = value

    def samples(self) -> Iterator[Sample]:
        for key, value in self.values.items():
            yield "", self.labels, key, value


class CounterSnapshot(Counter):
    """A count someone else keeps (the pool's refusals, the usage writer's records), read at scrape."""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (),
                 values: Iterable[tuple[tuple[str, ...], float]] = ()) -> None:
        super().__init__(name, help, labels)
        self.values = dict(values)


class Histogram(Family):
    """Buckets are kept per bucket (not cumulative): an observation adds to one count only."""

    __slots__ = ("bounds", "series")

    def __init__(self, name: str, help: str, labels: tuple[str, ...], bounds: tuple[float, ...]) -> None:
        super().__init__(name, help, labels, "histogram")
        assert list(bounds) == sorted(bounds) and not math.isinf(bounds[-1])
        self.bounds = bounds
        # per label values: [count in each bucket ..., count above the last bound, sum]
        self.series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        counts = self.series.get(key)
        if counts is None:
            counts = self.series[key] = [0.0] * (len(self.bounds) + 2)
        counts[bisect.bisect_left(self.bounds, value)] += 1     # le: a value on a bound counts in it
        counts[-1] += value

    def samples(self) -> Iterator[Sample]:
        names = self.labels + ("le",)
        # as client libraries write them ("1.0"): OpenMetrics wants one spelling of each bound
        edges = [repr(float(b)) for b in self.bounds] + ["+Inf"]
        for key, counts in self.series.items():
            running = 0.0
            for edge, n in zip(edges, counts):
                running += n
                yield "_bucket", names, key + (edge,), running
            yield "_count", self.labels, key, running
            yield "_sum", self.labels, key, counts[-1]


# Bucket bounds, in seconds unless named otherwise. The GenAI ones are OpenTelemetry's advice for
# gen_ai.server.request.duration, gen_ai.server.time_to_first_token and gen_ai.client.token.usage.
DURATION = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
FIRST_TOKEN = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
# the gateway's own share of a request: tens of microseconds when well, milliseconds when not
OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
