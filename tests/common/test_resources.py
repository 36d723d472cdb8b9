"""Kubernetes quantities, parsed exactly, and the CI variables that carry a size."""

from __future__ import annotations

import pytest

from ciretry.common.events import Resources
from ciretry.common.resources import (
    DEFAULT_VARIABLES,
    larger,
    parse_cpu_millis,
    parse_memory_mb,
    resources_of,
)


@pytest.mark.parametrize(
    ("text", "mb"),
    [
        ("512Mi", 512),
        ("1Gi", 1024),
        ("32Gi", 32768),
        ("1.5Gi", 1536),
        ("1Ti", 1024 * 1024),
        ("1048576Ki", 1024),
        ("1073741824", 1024),  # plain bytes
        (1073741824, 1024),
        ("1G", 954),  # 10^9 bytes is 953.67 MiB: rounded up, never below what the pod had
        ("1e9", 954),
        ("128M", 123),
        ("1", 1),  # one byte still needs a MiB
        ("100m", 1),  # a thousandth of a byte (the format allows it)
        ("+2Gi", 2048),
        (".5Gi", 512),
    ],
)
def test_memory_quantities(text: str | int, mb: int) -> None:
    assert parse_memory_mb(text) == mb


@pytest.mark.parametrize(
    "text", ["", "1GB", "1gi", "-1Gi", "Gi", "1 Gi", "abc", "1e", "0", "1Zi", None, True, "9" * 70]
)
def test_what_is_not_a_memory_quantity(text: object) -> None:
    assert parse_memory_mb(text) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "millis"),
    [("2", 2000), ("500m", 500), ("0.25", 250), ("1.5", 1500), ("1k", 1_000_000), ("0.0001", 1)],
)
def test_cpu_quantities(text: str, millis: int) -> None:
    assert parse_cpu_millis(text) == millis


def test_resources_of_a_container_spec() -> None:
    r = resources_of({"memory": "1Gi", "cpu": "500m"}, {"memory": "32Gi", "cpu": 2})
    assert r == Resources(
        memory_request_mb=1024, memory_limit_mb=32768, cpu_request_millis=500, cpu_limit_millis=2000
    )
    assert r.memory_mb == 32768 and r.cpu_millis == 2000
    assert resources_of({}, {"nvidia.com/gpu": "1"}) is None
    assert resources_of({"memory": "lots"}, {}) is None  # unreadable is unknown, not guessed


def test_larger_is_field_by_field() -> None:
    a = Resources(memory_limit_mb=4096, cpu_limit_millis=1000)
    b = Resources(memory_limit_mb=2048, cpu_limit_millis=4000, memory_request_mb=512)
    assert larger(a, b) == Resources(
        memory_limit_mb=4096, cpu_limit_millis=4000, memory_request_mb=512
    )
    assert larger(None, b) is b and larger(a, None) is a and larger(None, None) is None


def test_variables_round_trip() -> None:
    r = Resources(
        memory_request_mb=8192, memory_limit_mb=8192, cpu_request_millis=1500, cpu_limit_millis=2000
    )
    rendered = DEFAULT_VARIABLES.render(r)
    assert ("KUBERNETES_MEMORY_LIMIT", "8192Mi") in rendered
    assert ("KUBERNETES_CPU_LIMIT", "2000m") in rendered
    assert DEFAULT_VARIABLES.read(dict(rendered)) == r
    # What people write by hand reads the same way.
    assert DEFAULT_VARIABLES.read({"KUBERNETES_MEMORY_LIMIT": "8Gi"}) == Resources(
        memory_limit_mb=8192
    )
    assert DEFAULT_VARIABLES.read({"OTHER": "1"}) is None
    assert DEFAULT_VARIABLES.render(None) == []
