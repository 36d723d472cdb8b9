"""Container sizes: Kubernetes quantities parsed exactly, and the CI variables that carry a size.

Pure. Both sides of a rerun with more memory use this module: act writes the size it asks for
into the new pipeline's variables (``ResourceVariables.render``), ingest reads it back from the
pipeline's hooks (``ResourceVariables.read``) and the size a pod actually ran with from its spec
(``parse_memory_mb`` / ``parse_cpu_millis``), so "the size that died" and "the size asked for"
are measured in the same units.

Quantities (Kubernetes ``resource.Quantity``): a decimal number (``1``, ``1.5``, ``1e9``, ``.5``)
with an optional suffix: binary ``Ki Mi Gi Ti Pi Ei``, decimal ``k M G T P E``, or ``m``
(thousandths). Memory is converted to MiB rounded *up* (a size read back is never below what the
container had), CPU to millicores rounded up. Anything else is ``None`` for the caller to report:
a size that cannot be read is unknown, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from .events import Resources

_QUANTITY = re.compile(
    r"^([+]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$"
)
_FACTORS: Mapping[str, Fraction] = {
    "": Fraction(1),
    "m": Fraction(1, 1000),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
    "Pi": Fraction(2**50),
    "Ei": Fraction(2**60),
}
_MIB = 2**20
#: Sizes beyond this are not container sizes (and would not fit the events' integers).
_MAX_UNITS = 2**31 - 1


def parse_quantity(text: str) -> Fraction | None:
    """The exact value of a Kubernetes quantity, or None when ``text`` is not one."""
    if not isinstance(text, str) or len(text) > 64:
        return None
    m = _QUANTITY.match(text.strip())
    if m is None:
        return None
    try:
        number = Fraction(Decimal(m.group(1)))
    except (InvalidOperation, ValueError, OverflowError):
        return None
    return number * _FACTORS[m.group(2) or ""]


def _ceil(value: Fraction) -> int:
    return -((-value.numerator) // value.denominator)


def _amount(text: str | int | None, per_unit: Fraction) -> int | None:
    """A quantity in a whole number of units, rounded up; None when absent or unreadable."""
    if text is None or isinstance(text, bool):
        return None
    value = Fraction(text) if isinstance(text, int) else parse_quantity(text)
    if value is None or value < 0:
        return None
    n = _ceil(value * per_unit)
    return n if 0 < n <= _MAX_UNITS else None


def parse_memory_mb(text: str | int | None) -> int | None:
    """A memory quantity in MiB, rounded up; None when absent or unreadable."""
    return _amount(text, Fraction(1, _MIB))


def parse_cpu_millis(text: str | int | None) -> int | None:
    """A CPU quantity in millicores, rounded up; None when absent or unreadable."""
    return _amount(text, Fraction(1000))


def resources_of(requests: Mapping[str, object], limits: Mapping[str, object]) -> Resources | None:
    """A container's ``resources.requests`` / ``resources.limits`` as ``Resources`` (None when
    neither says anything about memory or CPU). Unreadable values count as absent."""

    def get(where: Mapping[str, object], key: str) -> str | int | None:
        value = where.get(key)
        return value if isinstance(value, str | int) and not isinstance(value, bool) else None

    r = Resources(
        memory_request_mb=parse_memory_mb(get(requests, "memory")),
        memory_limit_mb=parse_memory_mb(get(limits, "memory")),
        cpu_request_millis=parse_cpu_millis(get(requests, "cpu")),
        cpu_limit_millis=parse_cpu_millis(get(limits, "cpu")),
    )
    return r if r != Resources() else None


def larger(a: Resources | None, b: Resources | None) -> Resources | None:
    """Field by field, the larger of two sizes (unknown fields take the other's value)."""
    if a is None or b is None:
        return a or b

    def big(x: int | None, y: int | None) -> int | None:
        return y if x is None else x if y is None else max(x, y)

    return Resources(
        memory_request_mb=big(a.memory_request_mb, b.memory_request_mb),
        memory_limit_mb=big(a.memory_limit_mb, b.memory_limit_mb),
        cpu_request_millis=big(a.cpu_request_millis, b.cpu_request_millis),
        cpu_limit_millis=big(a.cpu_limit_millis, b.cpu_limit_millis),
    )


@dataclass(frozen=True, slots=True)
class ResourceVariables:
    """Names of the CI variables that carry a rerun's size: what the runner reads, e.g.
    gitlab-runner's Kubernetes executor overwrite variables (which the runner must allow with
    ``memory_limit_overwrite_max_allowed`` and friends)."""

    memory_limit: str = "KUBERNETES_MEMORY_LIMIT"
    memory_request: str = "KUBERNETES_MEMORY_REQUEST"
    cpu_limit: str = "KUBERNETES_CPU_LIMIT"
    cpu_request: str = "KUBERNETES_CPU_REQUEST"

    def render(self, r: Resources | None) -> list[tuple[str, str]]:
        """(name, value) pairs for ``r``: memory in ``Mi``, CPU in ``m``."""
        if r is None:
            return []
        pairs = [
            (self.memory_limit, r.memory_limit_mb, "Mi"),
            (self.memory_request, r.memory_request_mb, "Mi"),
            (self.cpu_limit, r.cpu_limit_millis, "m"),
            (self.cpu_request, r.cpu_request_millis, "m"),
        ]
        return [(name, f"{value}{unit}") for name, value, unit in pairs if value and name]

    def read(self, variables: Mapping[str, str]) -> Resources | None:
        """The size ``variables`` ask for (None when they set none)."""
        r = Resources(
            memory_request_mb=parse_memory_mb(variables.get(self.memory_request)),
            memory_limit_mb=parse_memory_mb(variables.get(self.memory_limit)),
            cpu_request_millis=parse_cpu_millis(variables.get(self.cpu_request)),
            cpu_limit_millis=parse_cpu_millis(variables.get(self.cpu_limit)),
        )
        return r if r != Resources() else None


DEFAULT_VARIABLES = ResourceVariables()

__all__ = [
    "DEFAULT_VARIABLES",
    "ResourceVariables",
    "larger",
    "parse_cpu_millis",
    "parse_memory_mb",
    "parse_quantity",
    "resources_of",
]
