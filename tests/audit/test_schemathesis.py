"""Schemathesis against the read API's own OpenAPI document, on a seeded and projected store.

Every operation gets requests generated from the document: schema-valid ones (they must be
answered 2xx/404, never 400, and every answer must match its documented status, content type
and schema) and schema-invalid ones (they must be refused with a 4xx). No answer may be a 5xx.
A few limits cannot be written in OpenAPI, or only clumsily: ``to`` after ``from`` and at most
400 days apart, a dispute needs a ``why``, times Python cannot hold (a leap second, a year-1
offset), and no NUL character in any parameter (PostgreSQL text cannot hold one). A 400
that names one of those is accepted for a schema-valid request; any other 400 is a mismatch
between the document and the API.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from .conftest import AUTH
from .helpers import Seeded

Client = TestClient[web.Request, web.Application]

#: Rules of the API that OpenAPI cannot state (see the module docstring).
UNWRITTEN_LIMITS = (
    "'to' must be after 'from'",
    "time range is limited to",
    "a dispute needs a why",
    "not an ISO 8601 time",
    "out of range",
    "must not contain NUL",  # PostgreSQL text cannot hold it
)
EXAMPLES = 150


def _fuzz(spec: dict[str, Any], base_url: str, mode: GenerationMode) -> tuple[int, list[str]]:
    """Run every operation's generated cases against the server; returns (cases, failures)."""
    schema = schemathesis.openapi.from_dict(spec)
    failures: list[str] = []
    cases = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        try:
            cases += _fuzz_operation(operation, base_url, mode)
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing to get wrong (no parameters)
        except BaseException as exc:  # noqa: BLE001 - collected, reported all together
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    return cases, failures


def _fuzz_operation(operation: Any, base_url: str, mode: GenerationMode) -> int:
    documented = {p.name for p in operation.query}
    cases = 0

    @given(operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        nonlocal cases
        cases += 1
        query = case.query or {}
        response = case.call(base_url=base_url, headers=AUTH)
        assert response.status_code < 500, (case.as_curl_command(), response.text[:300])
        if mode is GenerationMode.POSITIVE and response.status_code == 400:
            message = response.json().get("message", "")
            assert any(limit in message for limit in UNWRITTEN_LIMITS), (
                case.as_curl_command(),
                message,
            )
            case.validate_response(response, excluded_checks=[positive_data_acceptance])
        elif mode is GenerationMode.NEGATIVE and response.status_code == 413:
            # A body over the documented 16 KiB cap is refused as too large (413, documented),
            # which schemathesis' list of rejections does not include.
            case.validate_response(response, excluded_checks=[negative_data_rejection])
        elif mode is GenerationMode.NEGATIVE and (
            set(query) - documented
            or any(v == "" or isinstance(v, dict | list) for v in query.values())
        ):
            # An unknown query parameter is ignored, as web APIs do, not refused; an empty one
            # means its default (documented: anyOf the type or ""), which the negative
            # generator does not always see; an object has no query-string form (it is sent
            # as nothing at all, which is the default).
            case.validate_response(response, excluded_checks=[negative_data_rejection])
        else:
            case.validate_response(response)

    check()
    return cases


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
async def test_read_api_conforms_to_its_openapi_document(
    seeded: Seeded, client: Client, mode: GenerationMode
) -> None:
    spec = await (await client.get("/api/v1/openapi.json")).json()
    base_url = str(client.make_url("")).rstrip("/")
    cases, failures = await asyncio.to_thread(_fuzz, spec, base_url, mode)
    assert not failures, "\n\n".join(failures)
    assert cases >= EXAMPLES  # it did run (several operations, up to EXAMPLES cases each)
