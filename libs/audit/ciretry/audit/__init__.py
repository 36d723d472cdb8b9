"""Audit: read models projected from the event log, the /api/v1 read API, the dashboard and
the ``ciretry audit`` commands (see docs/audit.md)."""

from __future__ import annotations

__all__: list[str] = []
