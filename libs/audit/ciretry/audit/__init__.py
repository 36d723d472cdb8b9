"""Audit: read models projected from the event log, the ``/api/v1`` read API, the dashboard and
the ``ciretry audit`` commands (see docs/audit.md). A component: ``mount(app, store, config)``
puts it into the process that serves it (ingest today) and returns its projector worker.

Map (imports point down; no module imports one above it):

========================  ======  =============================================================
module                    kind    what
========================  ======  =============================================================
``main``                  wires   ``mount``: store, queries, scope, routes, projector worker
``cli``                   wires   ``ciretry audit …`` and ``ciretry replay --projections``
``api``                   I/O     JSON handlers under ``/api/v1/`` (``openapi``: its document)
``dashboard``             I/O     HTML handlers at ``/``, sign-in, static files
``access``                pure    who may read: the ``read`` scope on a request; shared app keys
``projector``             I/O     follows the log, applies batches exactly once
``queries``               I/O     ``Audit``: the answers, shaped from the store's rows
``store``                 I/O     ``AuditStore``: every SQL statement of the audit, nowhere else
``pages``                 pure    the dashboard's HTML from query results
``projections``           pure    what each event changes in the read models (``Batch``)
``why``                   pure    "why was this job retried (or not)?" from its timeline
``openapi``               pure    the OpenAPI 3.1 document of the API
========================  ======  =============================================================
"""

from __future__ import annotations

from .main import mount

__all__ = ["mount"]
