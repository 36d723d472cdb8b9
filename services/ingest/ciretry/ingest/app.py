"""The ingest HTTP front door: authenticate, parse, normalize, commit, then answer.

Answers (every route):

* 202 ``{"status": "accepted", ...}`` only once the events are committed;
* 200 ``{"status": "duplicate"}`` when every event was already stored;
* 202 ``{"status": "ignored", "reason": ...}`` for payloads deliberately not stored;
* 400 ``{"error": "invalid_payload", "field": ..., "message": ...}`` for malformed/unknown ones;
* 401 bad or missing token/signature (also when no secret is configured: fail closed);
* 413 body above ``max_body_bytes`` (Content-Length checked first, then while reading);
* 415 not JSON;
* 503 with Retry-After when the database is unreachable or slow, so the sender retries.

No input yields a 500: the catch-all answers 503 (the sender retries; nothing is lost), and
values PostgreSQL would refuse are rejected by the normalizers first.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

import asyncpg
import msgspec
from aiohttp import web

from ciretry.common.auth import (
    PUSH,
    ProjectTokens,
    TokenSet,
    bearer,
    buildkite_signature_ok,
    scopes,
    signature_ok,
)
from ciretry.common.bus import Recorder
from ciretry.common.config import Config
from ciretry.common.errors import is_transient
from ciretry.common.eventlog import AppendResult, EventLog
from ciretry.common.events import Metadata, NewEvent, VerdictDisputed, VerdictReached, job_stream
from ciretry.common.groupcommit import AppendBatcher, BatcherClosed, outbox_fast_path
from ciretry.common.metrics import instruments
from ciretry.common.telemetry import trace_fields

from . import buildkite, github, gitlab, kubernetes, taskcluster
from .fields import Accepted, Dispute, Ignored, InvalidPayload, Result, parse_json

log = logging.getLogger(__name__)

BATCHER: Final = web.AppKey("ciretry_ingest_batcher", AppendBatcher)
JSON_TYPES: Final = frozenset({"application/json"})
RETRY_AFTER: Final = "5"

_encode = msgspec.json.Encoder().encode

Normalizer = Callable[[Mapping[str, str], Any], Result]


class _Reject(Exception):
    """Internal: stop handling and send this response."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _json(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=_encode(body), content_type="application/json", headers=headers
    )


def _error(status: int, error: str, message: str, field: str | None = None) -> web.Response:
    body: dict[str, str] = {"error": error, "message": message}
    if field is not None:
        body["field"] = field
    headers = {"Retry-After": RETRY_AFTER} if status == 503 else None
    return _json(status, body, headers)


class Ingest:
    """Route handlers; one instance per application."""

    def __init__(
        self,
        config: Config,
        batcher: AppendBatcher,
        *,
        correlation: kubernetes.Correlation = kubernetes.DEFAULT_CORRELATION,
    ) -> None:
        self.config = config
        self.batcher = batcher
        self.correlation = correlation
        self.gitlab_secrets = ProjectTokens.parse(config.gitlab_webhook_secrets)
        self.github_secrets = TokenSet.of(*config.github_webhook_secrets)
        self.buildkite_secrets = TokenSet.of(*config.buildkite_webhook_secrets)
        self.push = scopes(config)[PUSH]
        self.max_body = config.max_body_bytes
        self.metrics = instruments()

    # --- routes -------------------------------------------------------------------------

    async def gitlab(self, request: web.Request) -> web.Response:
        source = "gitlab"

        async def handle() -> web.Response:
            secrets = self.gitlab_secrets
            token = request.headers.get("X-Gitlab-Token")
            global_ok = secrets.matches_everywhere(token)
            if not global_ok and not secrets.has_project_tokens:
                return self._unauthorized("X-Gitlab-Token", secrets.configured)
            body = await self._read_json(request)
            if not global_ok and not secrets.matches_project(token, _gitlab_project(body)):
                return self._unauthorized("X-Gitlab-Token", True)
            return await self._store(source, gitlab.normalize(request.headers, body))

        return await self._guard(source, handle)

    async def github(self, request: web.Request) -> web.Response:
        source = "github"

        async def handle() -> web.Response:
            ctype = request.content_type
            form = ctype == "application/x-www-form-urlencoded"
            raw = await self._read(request, extra_types=("application/x-www-form-urlencoded",))
            secrets = self.github_secrets
            if not signature_ok(secrets, raw, request.headers.get("X-Hub-Signature-256")):
                return self._unauthorized("X-Hub-Signature-256", secrets.configured)
            if form:
                fields = urllib.parse.parse_qs(raw.decode("utf-8", "replace"))
                payload = fields.get("payload")
                if not payload:
                    raise InvalidPayload("payload", "form body without a payload field")
                raw = payload[0].encode()
            return await self._store(source, github.normalize(request.headers, self._parse(raw)))

        return await self._guard(source, handle)

    async def buildkite(self, request: web.Request) -> web.Response:
        source = "buildkite"

        async def handle() -> web.Response:
            raw = await self._read(request)
            secrets = self.buildkite_secrets
            # A webhook sends one of the two, as its Token setting says: the signature form
            # signs the body (and a timestamp), the token form sends the token in clear.
            signature = request.headers.get("X-Buildkite-Signature")
            if signature is not None:
                ok = buildkite_signature_ok(secrets, raw, signature, time.time())
            else:
                ok = secrets.matches(request.headers.get("X-Buildkite-Token"))
            if not ok:
                header = "X-Buildkite-Signature" if signature is not None else "X-Buildkite-Token"
                return self._unauthorized(header, secrets.configured)
            return await self._store(source, buildkite.normalize(request.headers, self._parse(raw)))

        return await self._guard(source, handle)

    async def kubernetes(self, request: web.Request) -> web.Response:
        source = "kubernetes"

        async def handle() -> web.Response:
            self._bearer(request)
            body = await self._read_json(request)
            return await self._store(source, kubernetes.normalize(body, self.correlation))

        return await self._guard(source, handle)

    async def pulse(self, request: web.Request) -> web.Response:
        source = "taskcluster"

        async def handle() -> web.Response:
            self._bearer(request)
            body = await self._read_json(request)
            return await self._store(source, taskcluster.normalize_http(request.headers, body))

        return await self._guard(source, handle)

    # --- steps --------------------------------------------------------------------------

    async def _guard(self, source: str, handle: Callable[[], Any]) -> web.Response:
        response = await self._respond(handle)
        if response.status >= 400:
            self.metrics.rejected_requests.add(1, {"source": source, "status": response.status})
        return response

    async def _respond(self, handle: Callable[[], Any]) -> web.Response:
        try:
            response: web.Response = await handle()
            return response
        except _Reject as reject:
            return reject.response
        except InvalidPayload as exc:
            return _json(400, exc.to_json())
        except BatcherClosed:
            return _error(503, "unavailable", "shutting down, retry")
        except TimeoutError:
            return _error(503, "unavailable", "event store too slow, retry")
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "too_large", f"body above {self.max_body} bytes")
        except asyncpg.DataError as exc:
            # A value PostgreSQL refuses as data (a NUL in text, say) that slipped past the
            # normalizer: the same payload would fail again, so not a 503. Logged: a bug.
            log.error("payload refused by the database: %s", type(exc).__name__)
            return _error(400, "invalid_payload", "a value the event log cannot store")
        except Exception as exc:
            if is_transient(exc):
                log.warning("event store unavailable: %s", type(exc).__name__)
                return _error(503, "unavailable", "event store unavailable, retry")
            # Not the sender's fault that we could not tell what went wrong: 503 makes it retry
            # (and the payload is kept by the sender), where a 500 might make it give up.
            log.exception("unexpected error while ingesting")
            return _error(503, "unavailable", "internal error, retry later")

    def _unauthorized(self, header: str, configured: bool) -> web.Response:
        message = f"bad or missing {header}" if configured else "no secret configured"
        return _error(401, "unauthorized", message)

    def _bearer(self, request: web.Request) -> None:
        if not self.push.allows(bearer(request.headers.get("Authorization"))):
            raise _Reject(self._unauthorized("Authorization", self.push.tokens.configured))

    async def _read(self, request: web.Request, extra_types: tuple[str, ...] = ()) -> bytes:
        ctype = request.content_type
        if ctype not in JSON_TYPES and ctype not in extra_types:
            raise _Reject(_error(415, "unsupported_media_type", "expected application/json"))
        length = request.content_length
        if length is not None and length > self.max_body:
            raise _Reject(_error(413, "too_large", f"body above {self.max_body} bytes"))
        # client_max_size (set to max_body on the app) makes read() stop at the limit, which
        # covers chunked bodies and lying Content-Length headers.
        return await request.read()

    async def _read_json(self, request: web.Request) -> Any:
        return self._parse(await self._read(request))

    @staticmethod
    def _parse(raw: bytes) -> Any:
        return parse_json(raw)

    async def _store(self, source: str, result: Result) -> web.Response:
        if isinstance(result, Dispute):
            found = await self._dispute(result)
            if found is None:
                return _json(202, {"status": "ignored",
                                   "reason": f"no verdict for job {result.job_id}"})  # fmt: skip
            result = found
        if isinstance(result, Ignored):
            return _json(202, {"status": "ignored", "reason": result.reason})
        assert isinstance(result, Accepted)
        for note in result.notes:
            log.warning("ingest: %s", note)
        results = await self.batcher.append(_with_trace(result.events))
        self._count(source, results)
        if all(r.duplicate for r in results):
            return _json(200, {"status": "duplicate"})
        body: dict[str, Any] = {
            "status": "accepted",
            "events": [str(r.event.event_id) for r in results if not r.duplicate],
        }
        if result.notes:
            body["notes"] = list(result.notes)
        return _json(202, body)

    async def _dispute(self, dispute: Dispute) -> Accepted | None:
        """The ``VerdictDisputed`` of a reply command, on the latest verdict of its job (in the
        job's stream, where the audit API's feedback endpoint records it too); None when there is none."""
        stream = job_stream(dispute.source, dispute.project, dispute.job_id)
        verdicts = [e for e in await self.batcher.store.read_stream(stream)
                    if isinstance(e.data, VerdictReached)]  # fmt: skip
        if not verdicts:
            return None
        verdict = verdicts[-1]
        event = NewEvent(
            stream=stream,
            data=VerdictDisputed(
                verdict_event_id=verdict.event_id, who=dispute.who[:200], why=dispute.why
            ),  # fmt: skip
            metadata=Metadata(
                idempotency_key=dispute.key,
                causation_id=str(verdict.event_id),
                source_delivery_id=dispute.delivery,
            ),  # fmt: skip
        )
        return Accepted([event])

    def _count(self, source: str, results: list[AppendResult]) -> None:
        for r in results:
            if r.duplicate:
                self.metrics.duplicates.add(1, {"source": source})
            else:
                data = r.event.data
                attrs = {"source": source, "type": data.type_name()}
                status = getattr(data, "status", None)
                if isinstance(status, str):
                    attrs["status"] = status
                self.metrics.events_ingested.add(1, attrs)


def _with_trace(events: list[NewEvent]) -> list[NewEvent]:
    fields = trace_fields()
    parent = fields.get("traceparent")
    if not parent:
        return events
    state = fields.get("tracestate")
    return [
        msgspec.structs.replace(
            e, metadata=msgspec.structs.replace(e.metadata, traceparent=parent, tracestate=state)
        )
        for e in events
    ]


def _gitlab_project(body: Any) -> str | None:
    """Project id for per-project secrets, read before full validation (None if absent)."""
    if not isinstance(body, dict):
        return None
    value = body.get("project_id")
    if value is None and isinstance(body.get("project"), dict):
        value = body["project"].get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else None


def create_app(
    config: Config,
    store: EventLog,
    recorder: Recorder | None = None,
    **options: Any,
) -> web.Application:
    """A stand-alone ingest application (tests, benchmarks); see ``install`` for the options."""
    app = web.Application(client_max_size=config.max_body_bytes)
    install(app, config, store, recorder, **options)
    return app


def install(
    app: web.Application,
    config: Config,
    store: EventLog,
    recorder: Recorder | None = None,
    *,
    correlation: kubernetes.Correlation = kubernetes.DEFAULT_CORRELATION,
    max_batch_events: int = 1000,
    batch_wait: float = 0.0,
    max_inflight: int = 2,
    append_timeout: float = 10.0,
) -> AppendBatcher:
    """Add ingest's routes to ``app``: ``POST /webhooks/gitlab``, ``/webhooks/github``,
    ``/webhooks/buildkite``, ``/webhooks/kubernetes`` and ``/pulse``. ``recorder`` (optional) provides the outbox fast
    path; without it events reach the bus through the outbox sweeper. The batcher starts and
    drains with the application."""
    publish = outbox_fast_path(recorder)
    batcher = AppendBatcher(
        store,
        name="ingest",
        publish=publish,
        max_events=max_batch_events,
        max_wait=batch_wait,
        max_inflight=max_inflight,
        flush_timeout=append_timeout,
    )
    app[BATCHER] = batcher
    ingest = Ingest(config, batcher, correlation=correlation)
    app.router.add_post("/webhooks/gitlab", ingest.gitlab)
    app.router.add_post("/webhooks/github", ingest.github)
    app.router.add_post("/webhooks/buildkite", ingest.buildkite)
    app.router.add_post("/webhooks/kubernetes", ingest.kubernetes)
    app.router.add_post("/pulse", ingest.pulse)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.close()

    app.cleanup_ctx.append(lifecycle)
    return batcher
