"""The metric table (`router.metrics.METRICS`) is what `Metrics` exports: one collector per
row, reached by the row's attribute, with the row's name, type, help and labels."""

from __future__ import annotations

import typing

from prometheus_client import Histogram

from router.metrics import LATENCY_BUCKETS, METRICS, Metrics


def test_every_row_is_a_collector_with_its_name_help_labels_and_buckets() -> None:
    metrics = Metrics()
    for spec in METRICS:
        collector = getattr(metrics, spec.attr)
        assert type(collector) is spec.kind, spec.attr
        assert (collector._name, collector._documentation, collector._labelnames) == (
            spec.name, spec.help, spec.labels), spec.attr
        if spec.kind is Histogram:
            assert collector._upper_bounds[:-1] == list(LATENCY_BUCKETS), spec.attr


def test_names_and_attributes_are_unique_and_every_attribute_is_typed_on_the_class() -> None:
    assert len({spec.name for spec in METRICS}) == len(METRICS)
    assert len({spec.attr for spec in METRICS}) == len(METRICS)
    hints = typing.get_type_hints(Metrics)
    assert {spec.attr: spec.kind for spec in METRICS} == {
        spec.attr: hints.get(spec.attr) for spec in METRICS}
