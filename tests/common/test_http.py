"""The HTTP client every service uses (ciretry.common.http): pure over a ``FunctionTransport``,
and the aiohttp transport over real HTTP against a fake server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest

from ciretry.common.http import (
    AiohttpTransport,
    FunctionTransport,
    HttpClient,
    HttpSettings,
    Request,
    Response,
    TransientError,
    TransportError,
    json_response,
    parse_retry_after,
    rate_limit_reset,
    with_query,
)
from tests.support.fakehttp import Call, FakeHttp, Reply, Sleeps

SECRET = "glpat-SECRET-123"
FAST = HttpSettings(timeout_s=1.0, max_attempts=3, backoff_base_s=0.01, backoff_cap_s=0.04)


def client(
    handler: object, settings: HttpSettings = FAST, sleep: Sleeps | None = None
) -> HttpClient:
    return HttpClient(
        FunctionTransport(handler),  # type: ignore[arg-type]
        "https://ci.example/api",
        headers={"Accept": "application/json"},
        credentials={"PRIVATE-TOKEN": SECRET},
        secret=SECRET,
        settings=settings,
        sleep=sleep or Sleeps(),
    )


async def test_a_call_gets_the_base_url_headers_query_and_decoded_json() -> None:
    seen: list[Request] = []

    def answer(request: Request) -> Response:
        seen.append(request)
        return json_response({"id": 7, "echo": request.json})

    got = await client(answer).request(
        "POST", "/projects/1/jobs", params=[("scope[]", "failed"), ("page", "2")], json={"a": 1}
    )
    assert got.status == 200 and got.data == {"id": 7, "echo": {"a": 1}}
    (request,) = seen
    assert request.url == "https://ci.example/api/projects/1/jobs?scope%5B%5D=failed&page=2"
    assert request.query == {"scope[]": "failed", "page": "2"}
    assert request.headers == {"Accept": "application/json", "PRIVATE-TOKEN": SECRET}
    assert request.timeout is not None and request.timeout.total == FAST.timeout_s


async def test_an_answer_that_is_not_json_has_no_data_and_its_text_is_scrubbed() -> None:
    def answer(request: Request) -> Response:
        return Response(403, {"Content-Type": "text/html"}, f"<h1>bad token {SECRET}</h1>".encode())

    got = await client(answer).request("GET", "/x")
    assert got.status == 403 and got.data is None
    assert got.text == "<h1>bad token ***</h1>"


@pytest.mark.parametrize("status", [429, 500, 502, 503])
async def test_429_and_5xx_are_transient_with_retry_after_and_scrubbed(status: int) -> None:
    def answer(request: Request) -> Response:
        return json_response({"message": f"slow down {SECRET}"}, status, {"Retry-After": "7"})

    with pytest.raises(TransientError) as caught:
        await client(answer).request("GET", "/projects/1/jobs")
    error = caught.value
    assert error.status == status and error.retry_after == 7.0
    assert str(error).startswith(f"GET /projects/1/jobs: HTTP {status}: ")
    assert SECRET not in str(error) and "***" in str(error)


async def test_no_answer_is_a_transport_error_naming_the_call() -> None:
    def answer(request: Request) -> Response:
        raise TransportError(f"ConnectionResetError: peer said {SECRET}")

    with pytest.raises(TransportError) as caught:
        await client(answer).request("GET", "/projects/1/jobs")
    assert str(caught.value) == "GET /projects/1/jobs: ConnectionResetError: peer said ***"


async def test_a_handler_slower_than_the_timeout_is_no_answer() -> None:
    async def answer(request: Request) -> Response:
        await asyncio.Event().wait()  # never answers
        raise AssertionError

    slow = client(answer, HttpSettings(timeout_s=0.01))
    with pytest.raises(TransportError, match="TimeoutError"):
        await slow.request("GET", "/x")


async def test_redirects_are_followed_and_credentials_stay_on_their_origin() -> None:
    seen: list[Request] = []

    def answer(request: Request) -> Response:
        seen.append(request)
        if request.path == "/api/logs":
            return Response(302, {"Location": "/api/logs/moved"})
        if request.path == "/api/logs/moved":
            return Response(307, {"Location": "https://blob.example/log?sig=abc"})
        return Response(200, {}, b"the log")

    http = client(answer)
    async with http.stream("GET", "/logs") as response:
        assert response.status == 200 and await response.read() == b"the log"
    assert [r.url for r in seen] == [
        "https://ci.example/api/logs",
        "https://ci.example/api/logs/moved",
        "https://blob.example/log?sig=abc",
    ]
    assert [("PRIVATE-TOKEN" in r.headers) for r in seen] == [True, True, False]


async def test_a_303_after_a_post_is_a_get_and_a_redirect_loop_ends() -> None:
    seen: list[Request] = []

    def answer(request: Request) -> Response:
        seen.append(request)
        if request.method == "POST":
            return Response(303, {"Location": "/api/result"})
        if request.path == "/api/result":
            return json_response({"done": True})
        return Response(301, {"Location": request.url})

    got = await client(answer).request("POST", "/create", json={"x": 1})
    assert got.data == {"done": True} and (seen[-1].method, seen[-1].json) == ("GET", None)
    with pytest.raises(TransientError, match="redirects"):
        await client(answer).request("GET", "/loop")


async def test_retrying_waits_retry_after_or_jittered_backoff_then_gives_up() -> None:
    statuses = [503, 429, 503, 503]

    def answer(request: Request) -> Response:
        status = statuses.pop(0)
        headers = {"Retry-After": "2"} if status == 429 else {}
        return json_response({}, status, headers)

    sleeps = Sleeps()
    http = client(
        answer, HttpSettings(max_attempts=3, backoff_base_s=1.0, backoff_cap_s=8.0), sleeps
    )
    with pytest.raises(TransientError) as caught:
        await http.retrying(lambda: http.request("GET", "/x"), "test")
    assert caught.value.attempts == 3 and caught.value.status == 503
    first, second = sleeps.delays
    assert 0.5 <= first <= 1.0 and second == 2.0  # backoff (jittered), then Retry-After
    assert statuses == [503]


async def test_retrying_does_not_wait_longer_than_the_cap() -> None:
    def answer(request: Request) -> Response:
        return json_response({}, 429, {"Retry-After": "3600"})

    sleeps = Sleeps()
    http = client(answer, HttpSettings(max_attempts=5, retry_after_cap_s=60.0), sleeps)
    with pytest.raises(TransientError) as caught:
        await http.retrying(lambda: http.request("GET", "/x"), "test")
    assert caught.value.attempts == 1 and sleeps.delays == []


async def test_retrying_logs_each_wait_without_the_token(caplog: pytest.LogCaptureFixture) -> None:
    answers = [json_response({"m": SECRET}, 502), json_response({"ok": True})]
    http = client(lambda request: answers.pop(0))
    with caplog.at_level(logging.WARNING):
        got = await http.retrying(lambda: http.request("GET", "/x"), "what")
    assert got.data == {"ok": True}
    assert "what: GET /x: HTTP 502" in caplog.text and SECRET not in caplog.text


async def test_requests_under_way_at_once_are_bounded_per_client() -> None:
    in_flight, most = 0, 0
    gate, four = asyncio.Event(), asyncio.Event()

    async def answer(request: Request) -> Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        if in_flight == 4:
            four.set()
        await gate.wait()
        in_flight -= 1
        return json_response({})

    c = client(answer, HttpSettings(timeout_s=30.0, max_in_flight=4))
    calls = [asyncio.create_task(c.request("GET", f"/jobs/{i}")) for i in range(50)]
    await asyncio.wait_for(four.wait(), 10)  # the first four are at the provider
    for _ in range(20):  # the rest had every chance to start: they wait for a slot
        await asyncio.sleep(0)
    assert in_flight == 4
    gate.set()
    assert all(r.status == 200 for r in await asyncio.gather(*calls))
    assert most == 4


async def test_a_used_up_rate_limit_is_waited_out_before_the_next_request() -> None:
    now = time.time()
    sent: list[str] = []

    def answer(request: Request) -> Response:
        sent.append(request.url)
        # GitLab's headers: nothing left in this window, which resets in 30 s.
        return json_response({}, headers={"RateLimit-Remaining": "0",
                                          "RateLimit-Reset": str(int(now) + 30)})  # fmt: skip

    sleeps = Sleeps()
    c = client(answer, sleep=sleeps)
    await c.request("GET", "/a")
    assert sleeps.delays == []
    await c.request("GET", "/b")
    (waited,) = sleeps.delays
    assert 25 < waited <= 31 and len(sent) == 2
    # Longer than the client will wait: the call fails as a 429 would, and nothing is sent.
    short = client(answer, HttpSettings(retry_after_cap_s=5.0), sleep=Sleeps())
    await short.request("GET", "/a")
    with pytest.raises(TransientError) as raised:
        await short.request("GET", "/b")
    assert raised.value.status == 429 and len(sent) == 3


def test_rate_limit_reset_reads_gitlab_and_github_headers() -> None:
    now = 1_700_000_000.0
    assert rate_limit_reset({"RateLimit-Remaining": "0", "RateLimit-Reset": "1700000012"}, now) == 12
    assert rate_limit_reset({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1700000005"}, now) == 5
    assert rate_limit_reset({"RateLimit-Remaining": "3", "RateLimit-Reset": "1700000012"}, now) is None
    assert rate_limit_reset({"RateLimit-Remaining": "0"}, now) is None
    assert rate_limit_reset({}, now) is None


async def test_a_streamed_body_comes_in_bounded_chunks() -> None:
    body = bytes(range(256)) * 40
    http = client(lambda request: Response(200, {}, [body[:5000], body[5000:]]))
    async with http.stream("GET", "/log") as response:
        chunks = [c async for c in response.iter_bytes(1024)]
    assert b"".join(chunks) == body and max(len(c) for c in chunks) <= 1024


def test_settings_and_helpers() -> None:
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert with_query("https://h/p?a=1", {"b": "2"}) == "https://h/p?a=1&b=2"
    assert with_query("https://h/p", None) == "https://h/p"
    assert HttpSettings(backoff_base_s=1, backoff_cap_s=4).delay(10, None) <= 4
    with pytest.raises(ValueError):
        HttpSettings(max_attempts=0)


# --- the aiohttp transport, over real HTTP -------------------------------------------------


@pytest.fixture
async def served() -> AsyncIterator[FakeHttp]:
    fake = FakeHttp()

    def log(call: Call, match: dict[str, str]) -> Reply:
        return Reply(200, b"x" * 100_000, chunk=1000)

    def moved(call: Call, match: dict[str, str]) -> Reply:
        return Reply.redirect("/log")

    async def stuck(call: Call, match: dict[str, str]) -> Reply:
        await asyncio.sleep(5)
        return Reply()

    fake.route("GET", "/log", log)
    fake.route("GET", "/moved", moved)
    fake.route("GET", "/stuck", stuck)
    await fake.started()
    yield fake
    await fake.close()


async def test_aiohttp_transport_streams_and_leaves_redirects_to_the_client(
    served: FakeHttp,
) -> None:
    transport = AiohttpTransport()
    try:
        response = await transport.send(Request("GET", served.url + "/moved"))
        assert response.status == 302 and response.headers["location"] == "/log"
        await response.aclose()
        http = HttpClient(transport, served.url, credentials={"PRIVATE-TOKEN": SECRET})
        async with http.stream("GET", "/moved") as response:
            assert response.status == 200 and response.content_length is None
            chunks = [c async for c in response.iter_bytes(4096)]
        assert sum(map(len, chunks)) == 100_000 and max(map(len, chunks)) <= 4096
        assert [c.path for c in served.calls] == ["/moved", "/moved", "/log"]
        assert served.calls[-1].headers["PRIVATE-TOKEN"] == SECRET  # same origin
    finally:
        await transport.aclose()


async def test_aiohttp_transport_turns_timeouts_and_refusals_into_transport_errors(
    served: FakeHttp,
) -> None:
    transport = AiohttpTransport()
    try:
        http = HttpClient(transport, served.url, settings=HttpSettings(timeout_s=0.2))
        with pytest.raises(TransportError, match="GET /stuck: .*Timeout") as timed_out:
            await http.request("GET", "/stuck")
        assert timed_out.value.sent  # it went out: the provider may have acted on it
        url = served.url
        await served.close()
        with pytest.raises(TransportError, match="Connect") as refused:
            await HttpClient(transport, url).request("GET", "/log")
        assert not refused.value.sent  # no connection: nothing was sent
    finally:
        await transport.aclose()
