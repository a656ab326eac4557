"""Reading the daemon's Prometheus /metrics in tests.

`scrape` GETs /metrics and parses it with prometheus_client into (sample name, labels) ->
value; `sample` and `series` read that. `metric_value` reads one sample from /metrics text.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemonfixtures import Api

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class HasApi(Protocol):
    @property
    def api(self) -> Api: ...


def parse_samples(text: str) -> Samples:
    """Prometheus text parsed: (sample name, labels) -> value."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            samples[(found.name, frozenset(found.labels.items()))] = found.value
    return samples


async def scrape(daemon: HasApi) -> Samples:
    """GET /metrics (no token), parsed."""
    status, text = await daemon.api.call("GET", "/metrics", token=None)
    assert status == 200, (status, text)
    return parse_samples(text)


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample `name` with exactly these labels, or None."""
    return samples.get((name, frozenset(labels.items())))


def series(samples: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return {key[1]: value for key, value in samples.items()
            if key[0] == name and want <= set(key[1])}


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """One sample of /metrics text (`name` with exactly these labels), or None."""
    return sample(parse_samples(text), name, **labels)
