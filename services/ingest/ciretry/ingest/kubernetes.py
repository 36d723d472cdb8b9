"""Kubernetes Pod objects -> PodTerminated, correlated to the CI job the pod ran.

Input: a v1 Pod, or a watch event ``{"type": ..., "object": <Pod>}`` (what ``kubectl get -w -o
json`` and most watchers forward).

Correlation (configurable, see ``Correlation``): gitlab-runner's Kubernetes executor (15.9+) puts
these *annotations* on every job pod by default, and the project id also as a *label*:

* ``job.runner.gitlab.com/id`` - the job id (unique in the GitLab instance)
* ``project.runner.gitlab.com/id`` - the project id
* ``job.runner.gitlab.com/name``, ``/ref``, ``/sha``, ``/url`` (not needed here)

The pipeline id is not set by default; add it with the runner's ``pod_labels`` /
``pod_annotations`` (``pipeline_id = "${CI_PIPELINE_ID}"``): keys ``pipeline_id`` and
``pipeline.runner.gitlab.com/id`` are read. Annotations win over labels (labels are truncated to
63 characters and users may set either). A pod without a job id is ignored.

What is extracted (the signals classify needs for OOM and preemption):

* the container: gitlab-runner's ``build`` container if it terminated, else the first terminated
  container that failed, else the first terminated one; ``state.terminated`` before
  ``lastState.terminated``: reason (``OOMKilled``, ``Error``, ``DeadlineExceeded``,
  ``ContainerCannotRun``...) and exit code;
* ``status.reason`` of the pod (``Evicted``, ``Shutdown``, ``Terminated``, ``NodeLost``...);
* the reason of the ``DisruptionTarget`` condition (``PreemptionByScheduler``,
  ``TerminationByKubelet``, ``EvictionByEvictionAPI``, ``DeletionByTaintManager``...).

Only finished pods are stored: phase Succeeded/Failed or a terminated container. Watchers send
the same pod many times; the idempotency key
``k8s:pod:{uid}:{container}:{finishedAt}:{pod reason}:{disruption reason}`` stores each distinct
terminal picture once (a later update that adds a disruption reason is a new fact). Without a
uid the key is a hash of the extracted fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ciretry.common.events import Metadata, NewEvent, PodTerminated, Source, job_stream

from .fields import (
    Accepted,
    Ignored,
    InvalidPayload,
    Result,
    content_hash,
    ident,
    obj,
    opt_int,
    opt_list,
    opt_obj,
    opt_str,
    opt_time,
    req_ident,
)

FINISHED_PHASES: Final = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True, slots=True)
class Correlation:
    """Where to find the CI job of a pod (annotation keys first, then label keys)."""

    source: Source = "gitlab"
    job_id_keys: Sequence[str] = ("job.runner.gitlab.com/id",)
    project_keys: Sequence[str] = ("project.runner.gitlab.com/id",)
    pipeline_keys: Sequence[str] = ("pipeline.runner.gitlab.com/id", "pipeline_id")
    #: Name of the container that runs the job script (gitlab-runner: ``build``).
    build_container: str = "build"
    #: Containers that are infrastructure, used only if nothing else terminated.
    helper_containers: Sequence[str] = field(default=("helper", "init-permissions"))


DEFAULT_CORRELATION: Final = Correlation()


def normalize(body: Any, correlation: Correlation = DEFAULT_CORRELATION) -> Result:
    data = obj(body, "")
    path = ""
    if "object" in data and "kind" not in data:
        data = obj(data.get("object"), "object")
        path = "object"
    kind = data.get("kind")
    if kind is not None and kind != "Pod":
        return Ignored(f"kind {str(kind)[:40]!r} is not a Pod")
    p = _p(path)
    meta = opt_obj(data, "metadata", path)
    if meta is None:
        raise InvalidPayload(p + "metadata", "required")
    mpath = p + "metadata"
    namespace = req_ident(meta, "namespace", mpath)
    name = req_ident(meta, "name", mpath)
    uid = meta.get("uid")
    annotations = _string_map(meta, "annotations", mpath)
    labels = _string_map(meta, "labels", mpath)

    job_id = _lookup(correlation.job_id_keys, annotations, labels, mpath)
    if job_id is None:
        return Ignored("pod has no CI job id (" + ", ".join(correlation.job_id_keys) + ")")
    project = _lookup(correlation.project_keys, annotations, labels, mpath)
    if project is None:
        raise InvalidPayload(mpath + ".annotations", "CI job pod without a project id")
    pipeline = _lookup(correlation.pipeline_keys, annotations, labels, mpath)

    status = opt_obj(data, "status", path) or {}
    spath = p + "status"
    phase = opt_str(status, "phase", spath)
    pod_reason = opt_str(status, "reason", spath)
    disruption = _disruption(status, spath)
    container = _pick_container(status, spath, correlation)
    if container is None and phase not in FINISHED_PHASES:
        return Ignored(f"pod not finished (phase {phase!r}, no terminated container)")

    c_name = c_reason = finished_raw = None
    exit_code = None
    finished_at = None
    if container is not None:
        c_name, term, tpath = container
        c_reason = opt_str(term, "reason", tpath)
        exit_code = opt_int(term, "exitCode", tpath)
        finished_raw = opt_str(term, "finishedAt", tpath)
        finished_at = opt_time(term, "finishedAt", tpath)

    event = PodTerminated(
        namespace=namespace,
        pod=name,
        source=correlation.source,
        project=project,
        job_id=job_id,
        pipeline_id=pipeline,
        container=c_name,
        container_reason=c_reason,
        exit_code=exit_code,
        pod_reason=pod_reason,
        disruption_reason=disruption,
        finished_at=finished_at,
    )
    if uid is not None:
        uid_s = ident(uid, mpath + ".uid")
        key = ":".join(
            (
                "k8s:pod",
                uid_s,
                c_name or "-",
                finished_raw or "-",
                pod_reason or "-",
                disruption or "-",
            )
        )
    else:
        key = "k8s:pod:hash:" + content_hash(
            namespace,
            name,
            job_id,
            c_name,
            c_reason,
            exit_code,
            finished_raw,
            pod_reason,
            disruption,
        )
    if len(key) > 512:  # its parts are safe text (fields.py), but may be long
        key = "k8s:pod:hash:" + content_hash(key)
    new = NewEvent(
        stream=job_stream(correlation.source, project, job_id),
        data=event,
        metadata=Metadata(idempotency_key=key),
    )
    return Accepted([new])


def _p(path: str) -> str:
    return f"{path}." if path else ""


def _string_map(parent: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    return opt_obj(parent, key, path) or {}


def _lookup(
    keys: Sequence[str],
    annotations: Mapping[str, Any],
    labels: Mapping[str, Any],
    path: str,
) -> str | None:
    for where, values in (("annotations", annotations), ("labels", labels)):
        for key in keys:
            value = values.get(key)
            if value is not None and value != "":
                return ident(value, f"{path}.{where}[{key!r}]")
    return None


def _disruption(status: Mapping[str, Any], path: str) -> str | None:
    for i, item in enumerate(opt_list(status, "conditions", path)):
        cpath = f"{path}.conditions[{i}]"
        cond = obj(item, cpath)
        if cond.get("type") == "DisruptionTarget" and cond.get("status") != "False":
            return opt_str(cond, "reason", cpath) or "DisruptionTarget"
    return None


def _pick_container(
    status: Mapping[str, Any], path: str, correlation: Correlation
) -> tuple[str, Mapping[str, Any], str] | None:
    """(name, terminated state, its path) of the container that tells how the job ended."""
    terminated: list[tuple[str, Mapping[str, Any], str]] = []
    for i, item in enumerate(opt_list(status, "containerStatuses", path)):
        cpath = f"{path}.containerStatuses[{i}]"
        cs = obj(item, cpath)
        name = ident(cs.get("name"), cpath + ".name")
        for state_key in ("state", "lastState"):
            state = opt_obj(cs, state_key, cpath)
            term = state and opt_obj(state, "terminated", f"{cpath}.{state_key}")
            if term:
                terminated.append((name, term, f"{cpath}.{state_key}.terminated"))
                break
    if not terminated:
        return None
    for entry in terminated:
        if entry[0] == correlation.build_container:
            return entry
    own = [e for e in terminated if e[0] not in correlation.helper_containers] or terminated
    for entry in own:
        if entry[1].get("exitCode") not in (0, None) or entry[1].get("reason") not in (
            None,
            "Completed",
        ):
            return entry
    return own[0]
