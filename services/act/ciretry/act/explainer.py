"""Telling people where they look, as an action of its own: read the chain's decisions from the
log, render (``explain``), post where the policy says (``posting``), record ``ExplanationPosted``.

It runs on its own consumers (act's decisions and outcomes, and finished pipelines), never on the
path of a retry: a provider that refuses a note or is down delays the note, never a retry. Each
post is checked at the provider first (our own note is found by its marker), done under an
exclusive claim of its target (one replica posts; at most ``max_posting`` posts under way per
replica, so explanations never crowd act's retries at the provider), rate-limited per target (one edit per
``explain_interval_s``; the latest state is always posted, later), and recorded in the target's
explain stream with the expected version, so a post whose record a crash lost is found and
recorded, not posted twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Callable, Mapping

from ciretry.common.bus import Append, metadata_from_context
from ciretry.common.errors import DependencyUnavailable
from ciretry.common.eventlog import EventLog, Tracking, WrongExpectedVersion
from ciretry.common.events import (
    ExplanationPosted,
    JobFinished,
    MergeRequestUpdated,
    NewEvent,
    PipelineFinished,
    PipelineLinked,
    RecordedEvent,
    RetryIssued,
    RetryParked,
    RetryRequested,
    RetrySkipped,
    VerdictReached,
    explain_stream,
    job_stream,
    pipeline_stream,
    review_stream,
)

from .breaker import ProviderBreaker
from .explain import (
    NO_LINKS,
    Decision,
    ExplainMode,
    Explanation,
    Links,
    Target,
    digest,
    explain,
    marker,
    plan_post,
    render_check_run,
    render_note,
    render_status,
    review_from_ref,
    targets,
)
from .policy import Policy
from .posting import Post, Posted, PostRefused, Publisher

log = logging.getLogger("ciretry.act.explain")

Clock = Callable[[], dt.datetime]

#: The durable consumers of the explainer (and their tracking rows).
CONSUMER = "act-explain"
PIPELINE_CONSUMER = "act-explain-pipeline"
OPEN_STATES = frozenset({"opened", "open", "reopened"})
#: "Seen elsewhere this week": the window of the counts on each job's line.
SEEN_WINDOW = dt.timedelta(days=7)


class NotYet(DependencyUnavailable):
    """Not now: the target was edited less than the interval ago, or another replica is posting
    on it. The message is handed back and the latest state posted later."""


class Explainer:
    def __init__(
        self,
        store: EventLog,
        append: Append,
        policy: Policy,
        publishers: Mapping[str, Publisher],
        *,
        links: Links = NO_LINKS,
        clock: Clock,
        max_posting: int = 2,
    ) -> None:
        """``max_posting``: posts under way at once in this replica. Explanations share the
        provider (its rate limit, its latency) with act's retries: a burst of them must not
        take the provider's capacity a retry needs."""
        self.store = store
        self.append = append
        self.policy = policy
        self.publishers = publishers
        self.links = links
        self.clock = clock
        #: The explainer's own breaker (act's retries have theirs: ``breaker``).
        self.breaker = ProviderBreaker()
        self._provider = self.breaker.call
        self._posting = asyncio.Semaphore(max_posting)
        self._in_flight = 0
        #: Most posts under way at once so far (what ``max_posting`` bounds).
        self.most_posting = 0

    # --- consumers -------------------------------------------------------------------------

    async def handle(
        self, event: RecordedEvent, consumer: str = CONSUMER
    ) -> list[ExplanationPosted]:
        """One of act's decisions or outcomes, or a finished pipeline: explain its chain again.
        The tracking row is recorded when done (not when the provider must be asked again)."""
        data = event.data
        posted: list[ExplanationPosted] = []
        if isinstance(data, Decision):
            origin = data.origin_pipeline_id or data.pipeline_id
            posted = await self.explain_chain(data.source, data.project, origin)
        elif isinstance(data, PipelineFinished) and self.policy.explains:
            origin = await self._origin(data.source, data.project, data.pipeline_id)
            posted = await self.explain_chain(data.source, data.project, origin)
        await self.store.record_tracking(Tracking(consumer, event.event_id))
        return posted

    async def _origin(self, source: str, project: str, pipeline_id: str) -> str:
        for rec in await self.store.read_stream(pipeline_stream(source, project, pipeline_id)):
            if isinstance(rec.data, PipelineLinked):
                request = await self.store.get_by_key(rec.data.retry_of)
                if request is not None and isinstance(request.data, RetryRequested):
                    return request.data.origin_pipeline_id or request.data.pipeline_id
        return pipeline_id

    # --- one chain -------------------------------------------------------------------------

    async def explain_chain(
        self, source: str, project: str, origin: str
    ) -> list[ExplanationPosted]:
        """Render the chain's explanation and post it where the policy says."""
        publisher = self.publishers.get(source)
        if publisher is None or not self.policy.explains:
            return []
        decisions, jobs, last = await self._chain(source, project, origin)
        ref = next((j.ref for j in jobs if j.pipeline_id == origin and j.ref), None)
        mode = self._mode(project, ref, decisions)
        if mode == "off" or not decisions or last is None:
            return []
        settings = self.policy.scope_for(project, ref).settings
        if (self.clock() - last).total_seconds() > settings.explain_max_age_s:
            return []  # old news (explain switched on after the fact): not written on
        review = review_from_ref(ref) or await self._review(source, project, ref)
        verdicts = await self._verdicts(decisions)
        # How often each of these failures (by signature) happened in other pipelines this
        # week: "known flaky" means more when it says how known.
        signatures = sorted({v.signature.id for v in verdicts.values() if v.signature})
        seen = await self.store.verdict_signature_counts(
            signatures, self.clock() - SEEN_WINDOW, other_than_pipeline=origin
        )
        expl = explain(source=source, project=project, pipeline_id=origin, decisions=decisions,
                       verdicts=verdicts, jobs=jobs, links=self.links,
                       seen_elsewhere=seen)  # fmt: skip
        posted: list[ExplanationPosted] = []
        for target in targets(mode, source, review):
            post = self._post(expl, target, review)
            if post is None:
                continue
            done = await self._publish(publisher, project, expl, post, settings.explain_interval_s)
            if done is not None:
                posted.append(done)
        return posted

    def _mode(self, project: str, ref: str | None, decisions: list[Decision]) -> ExplainMode:
        settings = self.policy.scope_for(project, ref).settings
        if not settings.enabled:
            return "off"
        if any(isinstance(d, RetrySkipped) and d.reason == "opted_out" for d in decisions):
            return "off"  # the change opted out (marker, label, user): no retries, no notes
        return settings.explain

    async def _chain(
        self, source: str, project: str, origin: str
    ) -> tuple[list[Decision], list[JobFinished], dt.datetime | None]:
        """The chain's decisions (from the origin's stream), every JobFinished of its
        pipelines, each in log order, and when the last decision was recorded."""
        first = await self.store.read_stream(pipeline_stream(source, project, origin))
        decided = [r for r in first if isinstance(r.data, Decision)]
        decisions: list[Decision] = [r.data for r in decided]  # type: ignore[misc]
        last = decided[-1].recorded_at if decided else None
        members = {d.pipeline_id for d in decisions}
        members |= {d.new_pipeline_id for d in decisions
                    if isinstance(d, RetryIssued) and d.new_pipeline_id}  # fmt: skip
        members.discard(origin)
        records = list(first)
        if members:
            more = await self.store.read_streams(
                [pipeline_stream(source, project, p) for p in sorted(members)]
            )
            for recs in more.values():
                records.extend(recs)
        records.sort(key=lambda r: r.position)
        jobs = [r.data for r in records if isinstance(r.data, JobFinished)]
        return decisions, jobs, last

    async def _review(self, source: str, project: str, ref: str | None) -> str | None:
        """The open merge/pull request from branch ``ref`` (the latest update of each)."""
        if not ref:
            return None
        latest: dict[str, MergeRequestUpdated] = {}
        for rec in await self.store.read_stream(review_stream(source, project, ref)):
            if isinstance(rec.data, MergeRequestUpdated):
                latest[rec.data.number] = rec.data
        open_ = [n for n, mr in latest.items() if mr.state in OPEN_STATES]
        return max(open_, key=lambda n: (len(n), n)) if open_ else None

    async def _verdicts(self, decisions: list[Decision]) -> dict[uuid.UUID, VerdictReached]:
        """The verdicts the decisions name, from their jobs' streams in one read."""
        named = [d for d in decisions
                 if isinstance(d, RetryRequested | RetrySkipped | RetryParked) and d.verdict_event_id]  # fmt: skip
        ids = {d.verdict_event_id for d in named}
        streams = sorted({job_stream(d.source, d.project, d.job_id) for d in named})
        found = await self.store.read_streams(streams) if streams else {}
        return {
            r.event_id: r.data
            for records in found.values()
            for r in records
            if r.event_id in ids and isinstance(r.data, VerdictReached)
        }

    def _post(self, expl: Explanation, target: Target, review: str | None) -> Post | None:
        if target in ("mr_note", "pr_comment"):
            if review is None:
                return None
            subject = f"{'mr' if target == 'mr_note' else 'pr'}-{review}"
            return Post(target=target, subject=subject, pipeline_id=expl.pipeline_id,
                        number=review, sha=expl.sha,
                        marker=marker(expl.source, expl.project, subject),
                        body=render_note(expl, subject))  # fmt: skip
        if not expl.sha:
            return None
        link = (
            self.links.why(expl.source, expl.project, expl.lines[0].job_id) if expl.lines else None
        )
        if target == "commit_status":
            return Post(target=target, subject=expl.sha, pipeline_id=expl.pipeline_id,
                        sha=expl.sha, status=render_status(expl, link))  # fmt: skip
        return Post(target=target, subject=expl.sha, pipeline_id=expl.pipeline_id, sha=expl.sha,
                    check=render_check_run(expl), details_url=link)  # fmt: skip

    async def _publish(
        self, publisher: Publisher, project: str, expl: Explanation, post: Post, interval: float
    ) -> ExplanationPosted | None:
        stream = explain_stream(expl.source, project, post.target, post.subject)
        content = digest(post.body, repr(post.status), repr(post.check))
        async with self._posting:
            self._in_flight += 1
            self.most_posting = max(self.most_posting, self._in_flight)
            try:
                return await self._claimed(
                    publisher, project, expl, post, interval, stream, content
                )
            finally:
                self._in_flight -= 1

    async def _claimed(
        self,
        publisher: Publisher,
        project: str,
        expl: Explanation,
        post: Post,
        interval: float,
        stream: str,
        content: str,
    ) -> ExplanationPosted | None:
        async with self.store.exclusive(f"explain:{stream}") as got:
            if not got:
                raise NotYet(f"{stream}: another replica is posting")
            history = await self.store.read_stream(stream)
            last = history[-1] if history else None
            last_data = (
                last.data if last is not None and isinstance(last.data, ExplanationPosted) else None
            )
            plan, wait = plan_post(
                last_data.pipeline_id if last_data else None,
                last_data.digest if last_data else None,
                (last_data.posted_at or last.recorded_at) if last_data and last else None,
                expl.pipeline_id,
                content,
                self.clock(),
                interval,
            )
            if plan != "post":
                return None
            if wait > 0:
                raise NotYet(f"{stream}: edited {interval - wait:.1f} s ago; again in {wait:.1f} s")
            try:
                async with self._provider(expl.source):
                    done = await publisher.publish(project, post)
            except PostRefused as exc:
                log.warning("explain: %s refused %s on %s: %s", expl.source, post.target,
                            post.subject, exc)  # fmt: skip
                return None
            return await self._record(stream, len(history), expl, post, content, done)

    async def _record(
        self, stream: str, version: int, expl: Explanation, post: Post, content: str, done: Posted
    ) -> ExplanationPosted | None:
        data = ExplanationPosted(
            source=expl.source,  # type: ignore[arg-type]
            project=expl.project,
            pipeline_id=expl.pipeline_id,
            target=post.target,
            subject=post.subject,
            provider_id=done.provider_id,
            digest=content,
            how=done.how,
            state=done.state,
            posted_at=self.clock(),
        )
        new = NewEvent(
            stream=stream,
            data=data,
            metadata=metadata_from_context(idempotency_key=f"explain:{stream}:{version + 1}"),
        )
        try:
            await self.append([new], expected={stream: version})
        except WrongExpectedVersion:
            return None  # recorded meanwhile (a claim that outlived its holder): theirs stands
        log.info("explain: %s %s on %s %s (%s)", done.how, post.target, expl.project,
                 post.subject, expl.headline)  # fmt: skip
        return data


__all__ = ["CONSUMER", "PIPELINE_CONSUMER", "Explainer", "NotYet"]
