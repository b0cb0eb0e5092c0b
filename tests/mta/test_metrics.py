"""mta/metrics.py's helpers against prometheus-client's own behaviour."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest, multiprocess
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from mta import metrics

BUCKETS = (0.05, 0.1, 1, 60)


def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("le", "")): s.value for m in registry.collect() for s in m.samples
            if not s.name.endswith("_created")}


def test_observe_all_leaves_what_one_observe_per_amount_leaves() -> None:
    # On a bound, between bounds, below the first, past the last finite one, zero, repeats.
    amounts = [0.05, 0.07, 0.0, 0.1, 0.5, 1, 59.9, 60, 61, 3600.5, 0.07, 0.07]
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    each = Histogram("mta_test_seconds", "t", buckets=BUCKETS, registry=one_by_one)
    together = Histogram("mta_test_seconds", "t", buckets=BUCKETS, registry=batched)
    for amount in amounts:
        each.observe(amount)
    metrics.observe_all(together, amounts[:5])
    metrics.observe_all(together, [])
    metrics.observe_all(together, amounts[5:])
    assert samples(batched) == samples(one_by_one)
    assert samples(batched)[("mta_test_seconds_bucket", "0.05")] == 2.0
    assert samples(batched)[("mta_test_seconds_bucket", "+Inf")] == len(amounts)


def test_observe_all_on_a_labelled_child() -> None:
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    each = Histogram("mta_test_seconds", "t", ["stage"], buckets=BUCKETS, registry=one_by_one)
    together = Histogram("mta_test_seconds", "t", ["stage"], buckets=BUCKETS, registry=batched)
    for amount in (0.2, 70.0):
        each.labels("a").observe(amount)
    metrics.observe_all(together.labels("a"), [0.2, 70.0])
    assert samples(batched) == samples(one_by_one)


def test_a_scrape_leaves_out_the_file_of_a_process_still_creating_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker just spawned has created its file but not yet sized it: the stock collector
    # fails the whole scrape on it (no header to read); ours leaves it out and counts the rest.
    live = MmapedDict(str(tmp_path / "counter_100.db"))
    live.write_value(mmap_key("mta_test_total", "mta_test_total", ["listener"], ["a"], "t"), 7.0, 0.0)
    live.close()
    (tmp_path / "counter_101.db").touch()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(struct.error):
        generate_latest(registry_of(multiprocess.MultiProcessCollector))
    assert 'mta_test_total{listener="a"} 7.0' in metrics.render().decode()
    assert [(m.name, [s.value for s in m.samples]) for m in metrics.merged()] == [("mta_test_total", [7.0])]


def registry_of(collector: type[multiprocess.MultiProcessCollector]) -> CollectorRegistry:
    registry = CollectorRegistry()
    collector(registry)
    return registry
