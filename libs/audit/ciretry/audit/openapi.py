"""The OpenAPI 3.1 document of ``/api/v1``, written by hand (served at /api/v1/openapi.json).

OpenAPI 3.1 schemas are JSON Schema 2020-12, so tests validate real responses against the
component schemas with plain ``jsonschema``.
"""

from __future__ import annotations

from typing import Any, get_args

from ciretry.common.events import BudgetClass, Category, SkipReason

from .queries import BUCKETS, MAX_PAGE, METRICS

_S = {"type": "string"}
_SN = {"type": ["string", "null"]}
_I = {"type": "integer"}
_IN = {"type": ["integer", "null"]}
_BN = {"type": ["boolean", "null"]}
_T = {"type": "string", "format": "date-time"}
_TN = {"type": ["string", "null"], "format": "date-time"}
#: A query parameter's time: RFC 3339 (what ``queries.parse_time`` reads); empty, as an
#: HTML form sends an unset field, means the default.
_QT = {"type": "string", "anyOf": [{"format": "date-time"}, {"maxLength": 0}]}


def _or_empty(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter that may also be sent empty (as an HTML form sends an unset field),
    meaning its default."""
    return {"anyOf": [schema, {"type": "string", "maxLength": 0}]}


_PAGE = _or_empty({"type": "integer", "minimum": 1, "maximum": MAX_PAGE})
#: Required text: at least one character that is not white space.
_TEXT = {"type": "string", "pattern": "\\S"}
_HEX = "[0-9a-fA-F]"
_DISPUTE_CURSOR = (
    f"^([0-9]{{1,16}}\\.{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}})?$"
)


def _obj(
    props: dict[str, Any], required: list[str] | None = None, extra: bool = False
) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": extra,
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(name: str) -> dict[str, Any]:
    return {"oneOf": [_ref(name), {"type": "null"}]}


_BUDGET = _obj({k: _I for k in (
    "job_attempts", "job_limit", "pipeline_retries", "pipeline_limit", "pipeline_jobs",
    "deterministic_failures",
)})  # fmt: skip

_SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _S, "message": _S}),
    "Event": _obj(
        {
            "event_id": {"type": "string", "format": "uuid"},
            "position": _I,
            "stream": _S,
            "stream_version": _I,
            "recorded_at": _T,
            "type": _S,
            "data": {"type": "object", "required": ["type"]},
            "metadata": {"type": "object"},
        }
    ),
    "Budget": _BUDGET,
    "Evidence": _obj({"rule": _S, "line": _I, "text": _S, "signal": _S}, required=["rule"]),
    "Verdict": _obj(
        {
            "event_id": _S,
            "category": _S,
            "retryable": {"type": "boolean"},
            "budget": {"enum": list(get_args(BudgetClass))},
            "action": _S,
            "confidence": {"type": "number"},
            "rules": {"type": "array", "items": _S},
            "evidence": {"type": "array", "items": _ref("Evidence")},
            "ruleset_version": _SN,
        }
    ),
    "Decision": _obj(
        {
            "kind": {"enum": ["requested", "skipped", "parked"]},
            "action": _SN,
            "reason": {"enum": [None, *get_args(SkipReason)]},
            "detail": _SN,
            "dry_run": {"type": "boolean"},
            "budget_class": _SN,
            "policy": _SN,
            "category": _S,
            "budget": _ref("Budget"),
            "resources": {"type": ["object", "null"]},
            "not_before": _TN,
            "storm_id": _SN,
        }
    ),  # fmt: skip
    "RetryOutcome": _obj({"outcome": {"enum": [None, "passed", "failed"]}, "job_id": _SN}),
    "Feedback": _obj(
        {
            "kind": {"enum": ["disputed", "confirmed"]},
            "who": _S,
            "why": _SN,
            "correct_category": _SN,
            "verdict_event_id": _S,
        }
    ),  # fmt: skip
    "JobRow": _obj(
        {
            "source": _S,
            "project": _S,
            "job_id": _S,
            "pipeline_id": _SN,
            "job_name": _SN,
            "status": _SN,
            "stage": _SN,
            "runner": _SN,
            "ref": _SN,
            "attempt": _IN,
            "failure_reason": _SN,
            "exit_code": _IN,
            "finished_at": _TN,
            "verdict_event_id": _SN,
            "category": _SN,
            "retryable": _BN,
            "budget": _SN,
            "rules": {"type": "array", "items": _S},
            "decision": {"enum": [None, "requested", "skipped", "parked"]},
            "decision_action": _SN,
            "decision_reason": _SN,
            "decision_detail": _SN,
            "dry_run": _BN,
            "retry_job_id": _SN,
            "call_status": {"enum": [None, "issued", "failed"]},
        }
    ),  # fmt: skip
    "JobTimeline": _obj(
        {
            "job": _ref("JobRow"),
            "events": {"type": "array", "items": _ref("Event")},
            "verdict": _nullable("Verdict"),
            "decision": _nullable("Decision"),
            "retry_outcome": _nullable("RetryOutcome"),
            "feedback": {"type": "array", "items": _ref("Feedback")},
        }
    ),
    "Why": _obj(
        {
            "summary": _S,
            "facts": _obj(
                {
                    "job": {"type": ["object", "null"]},
                    "verdict": _nullable("Verdict"),
                    "decision": _nullable("Decision"),
                    "execution": {
                        "oneOf": [
                            {"type": "null"},
                            _obj(
                                {
                                    "status": {
                                        "enum": [
                                            "issued",
                                            "failed",
                                            "retrying",
                                            "pending",
                                            "dry_run",
                                        ]
                                    },
                                    "new_job_id": _SN,
                                    "detail": _SN,
                                }
                            ),
                        ]
                    },
                    "retry_outcome": _nullable("RetryOutcome"),
                    "feedback": {"type": "array", "items": _ref("Feedback")},
                }
            ),
            "chain": _nullable("Chain"),
        }
    ),  # fmt: skip
    "Chain": _obj(
        {
            "origin_pipeline_id": _SN,
            "summary": _S,
            "attempts": {
                "type": "array",
                "items": _obj(
                    {
                        "job_id": _S,
                        "pipeline_id": _SN,
                        "status": _SN,
                        "category": _SN,
                        "decision": {"enum": [None, "requested", "skipped", "parked"]},
                        "action": _SN,
                        "reason": _SN,
                        "observed_memory_mb": _IN,
                        "requested_memory_mb": _IN,
                        "asked_memory_mb": _IN,
                    }
                ),
            },
        }
    ),
    "Pipeline": _obj(
        {
            "pipeline": _obj(
                {
                    "source": _S,
                    "project": _S,
                    "pipeline_id": _S,
                    "status": _SN,
                    "ref": _SN,
                    "sha": _SN,
                    "user": _SN,
                    "jobs_finished": _I,
                    "jobs_failed": _I,
                    "verdicts": _I,
                    "retries_requested": _I,
                    "retries_skipped": _I,
                    "retries_issued": _I,
                    "retries_failed": _I,
                    "budget_exhausted": _I,
                    "pipeline_retries": _IN,
                    "pipeline_limit": _IN,
                    "pipeline_jobs": _IN,
                    "first_seen": _TN,
                    "last_seen": _TN,
                }
            ),
            "jobs": {"type": "array", "items": _ref("JobRow")},
            "next_cursor": _SN,
            "retries": {
                "type": "array",
                "items": _obj(
                    {
                        "job_id": _S,
                        "job_name": _S,
                        "action": _S,
                        "category": _S,
                        "dry_run": {"type": "boolean"},
                        "outcome": {"enum": [None, "passed", "failed"]},
                        "outcome_job_id": _SN,
                    }
                ),
            },
        }
    ),  # fmt: skip
    "Stats": _obj(
        {
            "metric": _S,
            "bucket": {"enum": ["hour", "day", "week"]},
            "from": _T,
            "to": _T,
            "filters": _obj({"project": _SN, "source": _SN}),
            "total": _I,
            "series": {
                "type": "array",
                "items": _obj(
                    {
                        "key": _S,
                        "total": _I,
                        "points": {"type": "array", "items": _obj({"t": _T, "n": _I})},
                    }
                ),
            },
        }
    ),
    "EventPage": _obj({"events": {"type": "array", "items": _ref("Event")}, "next_cursor": _SN}),
    "Allocation": _obj(
        {
            "project": _S,
            "job_name": _S,
            "ref": _SN,
            "found": {"type": "boolean"},
            "matched_ref": _SN,
            "memory_request_mb": _IN,
            "memory_limit_mb": _IN,
            "cpu_request_millis": _IN,
            "cpu_limit_millis": _IN,
            "last_oom_at": _TN,
            "last_oom_job_id": _SN,
            "updated_at": _TN,
        }
    ),  # fmt: skip
    "Clusters": _obj(
        {
            "days": _I,
            "unexplained": {"type": "boolean"},
            "clusters": {"type": "array", "items": {"type": "object"}},
        }
    ),
    "Storms": _obj(
        {
            "days": _I,
            "storms": {"type": "array", "items": {"type": "object"}},
        }
    ),
    "Outcomes": _obj(
        {
            "days": _I,
            "by": _S,
            "items": {
                "type": "array",
                "items": _obj(
                    {
                        "rule": _SN,
                        "key": _SN,
                        "failures": _I,
                        "passed_on_retry": _I,
                        "failed_again_same": _I,
                        "failed_differently": _I,
                        "never_retried": _I,
                        "pass_rate": {"type": ["number", "null"]},
                        "pass_rate_low": {"type": "number"},
                        "pass_rate_high": {"type": "number"},
                    }
                ),
            },
        }
    ),  # fmt: skip
    "Disputed": _obj(
        {
            "rules": {
                "type": "array",
                "items": _obj({"rule": _S, "disputed": _I, "confirmed": _I}),
            },
            "disputes": {
                "type": "array",
                "items": _obj(
                    {
                        "event_id": _S,
                        "verdict_event_id": _S,
                        "who": _S,
                        "why": _SN,
                        "correct_category": _SN,
                        "source": _SN,
                        "project": _SN,
                        "job_id": _SN,
                        "category": _SN,
                        "rules": {"type": "array", "items": _S},
                        "recorded_at": _T,
                    }
                ),
            },
            "next_cursor": _SN,
        }
    ),  # fmt: skip
    "FeedbackRequest": _obj(
        {
            "verdict": {"enum": ["disputed", "confirmed"]},
            "who": {**_TEXT, "maxLength": 200},
            "why": {"type": ["string", "null"], "maxLength": 2000},
            "correct_category": {"enum": [*get_args(Category), None]},
        },
        required=["verdict", "who"],
    ),
    "FeedbackResponse": _obj(
        {
            "status": {"enum": ["recorded", "duplicate"]},
            "event_id": _S,
            "stream": _S,
            "type": {"enum": ["VerdictDisputed", "VerdictConfirmed"]},
        }
    ),  # fmt: skip
}


def _json(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": _ref(name)}}}


def _resp(name: str, ok: str = "200", extra: tuple[str, ...] = ("400", "401")) -> dict[str, Any]:
    out: dict[str, Any] = {ok: {"description": "OK", **_json(name)}}
    for code in extra:
        out[code] = {
            "description": {
                "400": "Bad request (the message says which limit)",
                "401": "Missing or wrong bearer token",
                "404": "Not found",
                "413": "Request body above 16 KiB",
            }[code],
            **_json("Error"),
        }
    return out  # fmt: skip


def _q(
    name: str, desc: str, required: bool = False, schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": desc,
            "schema": schema or _S}  # fmt: skip


_JOB_PARAMS = [
    {"name": "source", "in": "path", "required": True, "schema": _S},
    {"name": "project", "in": "path", "required": True, "schema": _S,
     "description": "Project as the source names it. A project with slashes (GitHub "
                    "owner/repo, GitLab group/sub/project) may be given with its slashes "
                    "as they are or percent-encoded as %2F."},
    {"name": "job", "in": "path", "required": True, "schema": _S},
]  # fmt: skip

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "ciretry audit API",
        "version": "1",
        "description": "Read-only queries over ciretry's event log and read models, plus "
        "feedback on verdicts. Every path except this document needs "
        "`Authorization: Bearer <token>`: a read token (or a feedback or admin token) for "
        "the queries, a feedback (or admin) token for the feedback POST; with no token "
        "configured every request is refused unless the deployment opened reading on purpose "
        "(CIRETRY_API_OPEN). Writes other than feedback answer 405.",
    },
    "components": {
        "schemas": _SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
    "security": [{"bearer": []}],
    "paths": {
        "/api/v1/jobs/{source}/{project}/{job}": {
            "get": {
                "summary": "A job attempt's timeline: every event, verdict evidence, decision",
                "parameters": _JOB_PARAMS,
                "responses": _resp("JobTimeline", extra=("401", "404")),
            }
        },
        "/api/v1/jobs/{source}/{project}/{job}/why": {
            "get": {
                "summary": "Why the job was retried or not: one paragraph plus the facts",
                "parameters": _JOB_PARAMS,
                "responses": _resp("Why", extra=("401", "404")),
            }
        },
        "/api/v1/pipelines/{source}/{project}/{pipeline}": {
            "get": {
                "summary": "A pipeline's summary, its jobs and its retries",
                "parameters": [
                    *_JOB_PARAMS[:2],
                    {"name": "pipeline", "in": "path", "required": True, "schema": _S},
                    _q("limit", f"jobs per page, default {MAX_PAGE}", schema=_PAGE),
                    _q("cursor", "next_cursor of the previous page",
                       schema={"type": "string", "pattern": "^[0-9]{0,7}$"}),
                ],
                "responses": _resp("Pipeline", extra=("400", "401", "404")),
            }
        },  # fmt: skip
        "/api/v1/stats": {
            "get": {
                "summary": "Time-bucketed counts of one metric, top keys by total",
                "parameters": [
                    _q("metric", "what to count", True, schema={"enum": list(METRICS)}),
                    _q("bucket", "bucket width (default day)", schema={"enum": list(BUCKETS)}),
                    _q("from", "start (default: 30 days before 'to')", schema=_QT),
                    _q("to", "end (default: now); after 'from', at most 400 days", schema=_QT),
                    _q("project", "only this project"),
                    _q("source", "only this source"),
                    _q("top", "number of keys (default 10)",
                       schema=_or_empty({"type": "integer", "minimum": 1, "maximum": 100})),
                ],
                "responses": _resp("Stats"),
            }
        },  # fmt: skip
        "/api/v1/events": {
            "get": {
                "summary": "Raw events in log order with cursor paging",
                "parameters": [
                    _q("stream", "only this stream"),
                    _q("type", "event type; repeat or comma-separate for several"),
                    _q("from", "recorded at or after", schema=_QT),
                    _q("to", "recorded before; after 'from', at most 400 days", schema=_QT),
                    _q("after", "only positions after this one",
                       schema=_or_empty({"type": "integer", "minimum": 0, "maximum": 2**63 - 1})),
                    _q("cursor", "next_cursor of the previous page",
                       schema={"type": "string", "pattern": "^[0-9]{0,18}$"}),
                    _q("limit", "page size (default 100)", schema=_PAGE),
                ],
                "responses": _resp("EventPage"),
            }
        },
        "/api/v1/allocation": {
            "get": {
                "summary": "Memory/CPU requests and limits a job should run with",
                "parameters": [
                    _q("project", "project", True, schema=_TEXT),
                    _q("job_name", "job name", True, schema=_TEXT),
                    _q("ref", "branch or tag; falls back to any ref of the job"),
                ],
                "responses": _resp("Allocation"),
            }
        },
        "/api/v1/clusters": {
            "get": {
                "summary": "Failures clustered by signature, ranked by impact, with rule stubs",
                "parameters": [
                    _q(
                        "days",
                        "window in days (default 30)",
                        schema=_or_empty({"type": "integer", "minimum": 1, "maximum": 400}),
                    ),
                    _q("project", "only this project"),
                    _q(
                        "all",
                        "1: every failure, not only those no rule explains",
                        schema={"type": "string", "enum": ["", "0", "1", "true", "false"]},
                    ),
                    _q("limit", "default 50", schema=_PAGE),
                ],
                "responses": _resp("Clusters"),
            }
        },  # fmt: skip
        "/api/v1/storms": {
            "get": {
                "summary": "Retry storms: one signature failing many pipelines at once, and "
                "the jobs parked meanwhile",
                "parameters": [
                    _q(
                        "days",
                        "window in days (default 30)",
                        schema=_or_empty({"type": "integer", "minimum": 1, "maximum": 400}),
                    ),
                    _q("limit", "default 50", schema=_PAGE),
                ],
                "responses": _resp("Storms"),
            }
        },
        "/api/v1/outcomes": {
            "get": {
                "summary": "How failures ended per rule, by project, runner, job or signature",
                "parameters": [
                    _q(
                        "days",
                        "1, 7 or 30 (default 7)",
                        schema=_or_empty({"type": "integer", "enum": [1, 7, 30]}),
                    ),
                    _q(
                        "by",
                        "group by (default none)",
                        schema={
                            "type": "string",
                            "enum": ["", "none", "project", "runner", "job", "signature"],
                        },
                    ),
                    _q("project", "only this project"),
                    _q("limit", "default 100", schema=_PAGE),
                ],
                "responses": _resp("Outcomes"),
            }
        },  # fmt: skip
        "/api/v1/verdicts/disputed": {
            "get": {
                "summary": "Disputes per rule and the latest disputes",
                "parameters": [
                    _q("rule", "only disputes of this rule"),
                    _q("limit", "default 50", schema=_PAGE),
                    _q("cursor", "next_cursor of the previous page (older disputes)",
                       schema={"type": "string", "pattern": _DISPUTE_CURSOR}),
                ],
                "responses": _resp("Disputed"),
            }
        },  # fmt: skip
        "/api/v1/verdicts/{event_id}/feedback": {
            "post": {
                "summary": "Dispute or confirm a verdict (appends VerdictDisputed/Confirmed)",
                "parameters": [
                    {
                        "name": "event_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "format": "uuid"},
                    },
                    {"name": "Idempotency-Key", "in": "header", "required": False, "schema": _S},
                ],
                "requestBody": {"required": True, **_json("FeedbackRequest")},
                "responses": _resp(
                    "FeedbackResponse", ok="201", extra=("400", "401", "404", "413")
                ),
            }
        },  # fmt: skip
        "/api/v1/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1 document"}},
            }
        },
    },
}

__all__ = ["DOCUMENT"]
