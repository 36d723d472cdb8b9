import dataclasses

import pytest

from ciretry.common.events import PodTerminated
from ciretry.ingest import kubernetes
from ciretry.ingest.fields import Accepted, Ignored, InvalidPayload

from .helpers import pod


def event(
    body: object, correlation: kubernetes.Correlation = kubernetes.DEFAULT_CORRELATION
) -> PodTerminated:
    result = kubernetes.normalize(body, correlation)
    assert isinstance(result, Accepted)
    (new,) = result.events
    assert isinstance(new.data, PodTerminated)
    return new.data


def test_oom_killed_build_container() -> None:
    result = kubernetes.normalize(pod())
    assert isinstance(result, Accepted)
    (new,) = result.events
    ev = new.data
    assert isinstance(ev, PodTerminated)
    assert new.stream == "job-gitlab-1-378"  # the job stream of the correlated GitLab job
    assert (ev.namespace, ev.pod, ev.source, ev.project, ev.job_id) == (
        "ci",
        "runner-abc-project-1-concurrent-0-xyz",
        "gitlab",
        "1",
        "378",
    )
    assert (ev.container, ev.container_reason, ev.exit_code) == ("build", "OOMKilled", 137)
    assert ev.pod_reason is None and ev.disruption_reason is None
    assert new.metadata.idempotency_key == (
        "k8s:pod:7d0c2b0e-4b43-4a57-9f0e-2f1e5f3c9a11:build:2024-05-01T10:09:30Z:-:-"
    )


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        ({"pod_reason": "Evicted", "reason": "Error"}, ("Error", 137, "Evicted", None)),
        (
            {"disruption": "PreemptionByScheduler", "reason": "Error"},
            ("Error", 137, None, "PreemptionByScheduler"),
        ),
        (
            {"pod_reason": "Shutdown", "disruption": "TerminationByKubelet"},
            ("OOMKilled", 137, "Shutdown", "TerminationByKubelet"),
        ),
        ({"reason": "DeadlineExceeded", "exit_code": 1}, ("DeadlineExceeded", 1, None, None)),
        (
            {"reason": "ContainerCannotRun", "exit_code": 128},
            ("ContainerCannotRun", 128, None, None),
        ),
    ],
)
def test_signals(kwargs: dict[str, object], expect: tuple[object, ...]) -> None:
    ev = event(pod(**kwargs))  # type: ignore[arg-type]
    assert (ev.container_reason, ev.exit_code, ev.pod_reason, ev.disruption_reason) == expect


def test_richer_picture_is_a_new_fact_same_picture_is_not() -> None:
    a = kubernetes.normalize(pod(reason="Error"))
    b = kubernetes.normalize(pod(reason="Error"))
    c = kubernetes.normalize(pod(reason="Error", disruption="PreemptionByScheduler"))
    assert isinstance(a, Accepted) and isinstance(b, Accepted) and isinstance(c, Accepted)
    assert a.events[0].metadata.idempotency_key == b.events[0].metadata.idempotency_key
    assert a.events[0].metadata.idempotency_key != c.events[0].metadata.idempotency_key


def test_watch_event_wrapper_and_last_state() -> None:
    body = pod()
    cs = body["status"]["containerStatuses"][1]
    cs["lastState"], cs["state"] = cs["state"], {"waiting": {"reason": "CrashLoopBackOff"}}
    ev = event({"type": "MODIFIED", "object": body})
    assert ev.container_reason == "OOMKilled"


def test_labels_and_configurable_keys() -> None:
    body = pod(annotations={}, labels={"ci/job": "55", "ci/project": "9", "ci/pipeline": "77"})
    assert isinstance(kubernetes.normalize(body), Ignored)
    custom = dataclasses.replace(
        kubernetes.DEFAULT_CORRELATION,
        job_id_keys=("ci/job",),
        project_keys=("ci/project",),
        pipeline_keys=("ci/pipeline",),
    )
    ev = event(body, custom)
    assert (ev.job_id, ev.project, ev.pipeline_id) == ("55", "9", "77")


def test_running_pod_is_ignored_and_not_a_pod_too() -> None:
    assert isinstance(kubernetes.normalize(pod(terminated=False, phase="Running")), Ignored)
    assert isinstance(kubernetes.normalize({"kind": "Node", "metadata": {}}), Ignored)


def test_evicted_pod_without_container_statuses() -> None:
    body = pod(pod_reason="Evicted")
    body["status"]["containerStatuses"] = []
    ev = event(body)
    assert ev.pod_reason == "Evicted" and ev.container is None


def test_malformed_pod_names_the_field() -> None:
    body = pod()
    body["metadata"]["annotations"]["job.runner.gitlab.com/id"] = ["x"]
    with pytest.raises(InvalidPayload) as exc:
        kubernetes.normalize(body)
    assert "job.runner.gitlab.com/id" in exc.value.field
    with pytest.raises(InvalidPayload) as exc:
        kubernetes.normalize({"kind": "Pod"})
    assert exc.value.field == "metadata"
