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
  container that failed (init containers too: a pod whose init container was OOMKilled never
  started the build), else the first terminated one; ``state.terminated`` before
  ``lastState.terminated``: reason (``OOMKilled``, ``Error``, ``DeadlineExceeded``,
  ``ContainerCannotRun``...) and exit code;
* the size of every terminated container and init container (``spec.containers[].resources`` /
  ``spec.initContainers[].resources``, the pod-level ``spec.resources`` where a container sets
  none), Kubernetes quantities parsed exactly (``ciretry.common.resources``): a rerun with more
  memory starts from what actually died;
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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ciretry.common.events import (
    ContainerFacts,
    Metadata,
    NewEvent,
    PodTerminated,
    Resources,
    Source,
    job_stream,
)
from ciretry.common.resources import resources_of

from .fields import (
    Accepted,
    Ignored,
    InvalidPayload,
    Result,
    content_hash,
    ident,
    number_id,
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

    # GitLab's ids are numbers; other sources' ids are checked as plain ids here.
    check = number_id if correlation.source == "gitlab" else ident
    job_id = _lookup(correlation.job_id_keys, annotations, labels, mpath, check)
    if job_id is None:
        return Ignored("pod has no CI job id (" + ", ".join(correlation.job_id_keys) + ")")
    project = _lookup(correlation.project_keys, annotations, labels, mpath, check)
    if project is None:
        raise InvalidPayload(mpath + ".annotations", "CI job pod without a project id")
    pipeline = _lookup(correlation.pipeline_keys, annotations, labels, mpath, check)

    status = opt_obj(data, "status", path) or {}
    spath = p + "status"
    phase = opt_str(status, "phase", spath)
    pod_reason = opt_str(status, "reason", spath)
    disruption = _disruption(status, spath)
    terminated = _terminated(status, spath)
    container = _pick_container(terminated, correlation)
    if container is None and phase not in FINISHED_PHASES:
        return Ignored(f"pod not finished (phase {phase!r}, no terminated container)")
    sizes = _sizes(opt_obj(data, "spec", path), p + "spec")

    c_name = c_reason = finished_raw = None
    exit_code = None
    finished_at = None
    c_init = False
    if container is not None:
        c_name, term, tpath, c_init = container
        c_reason = opt_str(term, "reason", tpath, limit=256)
        exit_code = opt_int(term, "exitCode", tpath)
        finished_raw = opt_str(term, "finishedAt", tpath)
        finished_at = opt_time(term, "finishedAt", tpath)
    facts = tuple(
        ContainerFacts(
            name=cname,
            init=init,
            reason=opt_str(cterm, "reason", cpath, limit=256),
            exit_code=opt_int(cterm, "exitCode", cpath),
            resources=sizes.get((cname, init)),
        )
        for cname, cterm, cpath, init in terminated
    )

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
        container_init=c_init,
        resources=sizes.get((c_name, c_init)) if c_name is not None else None,
        containers=facts,
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
    check: Callable[[Any, str], str] = ident,
) -> str | None:
    for where, values in (("annotations", annotations), ("labels", labels)):
        for key in keys:
            value = values.get(key)
            if value is not None and value != "":
                return check(value, f"{path}.{where}[{key!r}]")
    return None


def _disruption(status: Mapping[str, Any], path: str) -> str | None:
    for i, item in enumerate(opt_list(status, "conditions", path)):
        cpath = f"{path}.conditions[{i}]"
        cond = obj(item, cpath)
        if cond.get("type") == "DisruptionTarget" and cond.get("status") != "False":
            return opt_str(cond, "reason", cpath) or "DisruptionTarget"
    return None


#: (container name, terminated state, its JSON path, is an init container)
Terminated = tuple[str, Mapping[str, Any], str, bool]


def _terminated(status: Mapping[str, Any], path: str) -> list[Terminated]:
    """Every terminated container and init container, regular containers first."""
    out: list[Terminated] = []
    for key, init in (("containerStatuses", False), ("initContainerStatuses", True)):
        for i, item in enumerate(opt_list(status, key, path)):
            cpath = f"{path}.{key}[{i}]"
            cs = obj(item, cpath)
            name = ident(cs.get("name"), cpath + ".name")
            for state_key in ("state", "lastState"):
                state = opt_obj(cs, state_key, cpath)
                term = state and opt_obj(state, "terminated", f"{cpath}.{state_key}")
                if term:
                    out.append((name, term, f"{cpath}.{state_key}.terminated", init))
                    break
    return out


def _failed(term: Mapping[str, Any]) -> bool:
    return term.get("exitCode") not in (0, None) or term.get("reason") not in (None, "Completed")


def _pick_container(
    terminated: Sequence[Terminated], correlation: Correlation
) -> Terminated | None:
    """The container that tells how the job ended."""
    if not terminated:
        return None
    for entry in terminated:
        if entry[0] == correlation.build_container and not entry[3]:
            return entry
    own = [e for e in terminated if e[0] not in correlation.helper_containers]
    for entry in own or terminated:
        if _failed(entry[1]):
            return entry
    # Only helpers failed (an init container killed before the build could start), or nothing.
    for entry in terminated:
        if _failed(entry[1]):
            return entry
    return (own or terminated)[0]


def _sizes(spec: Mapping[str, Any] | None, path: str) -> dict[tuple[str, bool], Resources]:
    """(container name, is init) -> its requests/limits from the pod spec."""
    if spec is None:
        return {}
    pod_level = _resources(spec, path)
    out: dict[tuple[str, bool], Resources] = {}
    for key, init in (("containers", False), ("initContainers", True)):
        for i, item in enumerate(opt_list(spec, key, path)):
            cpath = f"{path}.{key}[{i}]"
            c = obj(item, cpath)
            name = c.get("name")
            if not isinstance(name, str):
                continue
            size = _resources(c, cpath) or pod_level
            if size is not None:
                out[(name, init)] = size
    return out


def _resources(parent: Mapping[str, Any], path: str) -> Resources | None:
    res = opt_obj(parent, "resources", path)
    if res is None:
        return None
    rpath = f"{path}.resources"
    return resources_of(opt_obj(res, "requests", rpath) or {}, opt_obj(res, "limits", rpath) or {})
