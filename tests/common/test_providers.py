"""The providers' API conventions (ciretry.common.providers), pure over a ``FunctionTransport``."""

from __future__ import annotations

from typing import Any

import pytest

from ciretry.common.http import (
    ApiResponse,
    FunctionTransport,
    HttpSettings,
    Request,
    Response,
    json_response,
)
from ciretry.common.providers import (
    GITHUB,
    GITLAB,
    TASKCLUSTER_QUEUE,
    gitlab_next_page,
    gitlab_pages,
    gitlab_project,
)


def page(rows: list[Any], status: int = 200, **headers: str) -> ApiResponse:
    return ApiResponse(status, {k.replace("_", "-"): v for k, v in headers.items()}, rows, "")


def test_gitlab_project_is_one_quoted_segment() -> None:
    assert gitlab_project("42") == "/projects/42"
    assert gitlab_project("grp/sub/my.repo") == "/projects/grp%2Fsub%2Fmy.repo"


@pytest.mark.parametrize(
    ("response", "following"),
    [
        (page([1] * 100, X_Next_Page="3"), 3),
        (page([1] * 100, X_Next_Page=""), None),  # the last page says so
        (page([1] * 100, X_Total="250"), 3),  # no X-Next-Page: counted from the total
        (page([1] * 50, X_Total="250"), 3),
        (page([1] * 100, X_Total="200"), None),
        (page([1] * 100), 3),  # no totals (above 10,000 rows): a full page may have a next
        (page([1] * 99), None),
        (page([], 500), None),  # an error ends the listing: the caller judges it
    ],
)
def test_gitlab_next_page(response: ApiResponse, following: int | None) -> None:
    assert gitlab_next_page(response, 2, 100) == following


async def test_gitlab_pages_follow_the_headers_and_retry_when_asked() -> None:
    seen: list[Request] = []

    def answer(request: Request) -> Response:
        seen.append(request)
        number = int(request.query["page"])
        if number == 2 and len(seen) == 2:  # page 2 throttled the first time
            return json_response({}, 429, {"Retry-After": "0"})
        following = "" if number == 3 else str(number + 1)
        return json_response([number], headers={"X-Next-Page": following})

    gitlab = GITLAB.client(FunctionTransport(answer), "https://gl.example/", "tok")
    got = [
        p.items
        async for p in gitlab_pages(gitlab, "/projects/1/jobs", {"scope[]": "failed"}, retry=True)
    ]
    assert got == [[1], [2], [3]]
    assert seen[0].url == (
        "https://gl.example/api/v4/projects/1/jobs?scope%5B%5D=failed&per_page=100&page=1"
    )
    assert seen[0].headers == {"PRIVATE-TOKEN": "tok"}
    assert [r.query["page"] for r in seen] == ["1", "2", "2", "3"]


async def test_the_providers_credentials() -> None:
    seen: list[Request] = []

    def answer(request: Request) -> Response:
        seen.append(request)
        return json_response({})

    transport = FunctionTransport(answer)
    settings = HttpSettings()
    await GITHUB.client(transport, "https://api.github.com", "ghp_x", settings=settings).request(
        "GET", "/repos/o/r"
    )
    await GITLAB.client(transport, "https://gl.example", "", settings=settings).request("GET", "/x")
    await TASKCLUSTER_QUEUE.client(transport, "https://tc.example", "client:access").request(
        "POST", "/task/T/rerun"
    )
    await TASKCLUSTER_QUEUE.client(transport, "https://tc.example", "").request(
        "GET", "/task/T/status"
    )
    github, anonymous_gitlab, hawk, anonymous_tc = seen
    assert github.headers == {
        "Accept": "application/vnd.github+json",
        "X-GitHub-Api-Version": "2022-11-28",
        "Authorization": "Bearer ghp_x",
    }
    assert anonymous_gitlab.headers == {}
    assert hawk.url == "https://tc.example/api/queue/v1/task/T/rerun"
    assert hawk.headers["Authorization"].startswith('Hawk id="client", ts="')
    assert "access" not in hawk.headers["Authorization"].split("mac=")[0]
    assert anonymous_tc.headers == {}
