"""The dashboard's HTML: pure functions of the query results, no I/O.

Server-rendered, every number in a table readable without JavaScript. Charts are drawn by the
vendored Chart.js (``static/chart.umd.min.js``, MIT, see its license file beside it) from the
same numbers as the tables, embedded in the page as JSON; nothing is fetched from a CDN. As the
tables and the chart data come from one call of ``render_*``, what the tables say and what the
charts draw cannot disagree.
"""

from __future__ import annotations

import html
import json
import typing
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Any, Final

from ciretry.common.events import Category

COLORS: Final = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
)  # fmt: skip

_CSS = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:1rem;color:#222}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
td.n{text-align:right}.grid{display:grid;grid-template-columns:1fr 1fr;gap:1rem}
.chart{position:relative;height:260px}pre{white-space:pre-wrap;margin:0;font-size:.8rem}
.summary{background:#f6f8fa;padding:.75rem;border-left:4px solid #4e79a7}
form.search input[type=text]{width:24rem}
"""


def escape(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def job_href(source: str, project: str, job_id: str) -> str:
    return "/jobs/{}/{}/{}".format(
        urllib.parse.quote(source, safe=""),
        urllib.parse.quote(project, safe="/"),
        urllib.parse.quote(job_id, safe=""),
    )


def page(title: str, body: str, *, scripts: bool = False) -> str:
    js = (
        '<script src="/static/audit/chart.umd.min.js"></script>'
        '<script src="/static/audit/dashboard.js"></script>'
        if scripts
        else ""
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<meta name=viewport content='width=device-width,initial-scale=1'><title>{escape(title)}"
        f"</title><style>{_CSS}</style></head><body>"
        "<header><a href='/'>ciretry audit</a> <a href='/clusters'>Unexplained failures</a> "
        "<a href='/storms'>Retry storms</a> "
        "<form class=search method=get action='/search' style='display:inline'>"
        "<input type=text name=q id=search placeholder='job id, or source/project/job id' "
        "aria-label='find a job'> <button type=submit id=search-go>Open timeline</button>"
        f"</form></header><main>{body}</main>{js}</body></html>"
    )


def table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], *, ident: str = "", raw: int = -1
) -> str:
    """An HTML table; numbers right-aligned; column ``raw`` is inserted as HTML (links)."""
    out = [f"<table id='{escape(ident)}'>" if ident else "<table>", "<thead><tr>"]
    out += [f"<th>{escape(h)}</th>" for h in headers]
    out.append("</tr></thead><tbody>")
    n = 0
    for row in rows:
        n += 1
        cells = []
        for i, v in enumerate(row):
            if i == raw:
                cells.append(f"<td>{v}</td>")
            elif isinstance(v, int | float) and not isinstance(v, bool):
                cells.append(f"<td class=n>{escape(v)}</td>")
            else:
                cells.append(f"<td>{escape(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    if n == 0:
        out.append(f"<tr><td colspan={len(headers)}>nothing recorded</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _chart(ident: str) -> str:
    return f"<div class=chart><canvas id='{escape(ident)}' role=img></canvas></div>"


def spurious_rate(
    category: dict[str, Any], retryable: dict[str, Any]
) -> tuple[list[str], dict[str, list[float]]]:
    """Per time bucket: retryable (spurious) verdicts of each category / all failure verdicts."""
    totals: dict[str, int] = {}
    for s in category["series"]:
        for p in s["points"]:
            totals[p["t"]] = totals.get(p["t"], 0) + p["n"]
    labels = sorted(totals)
    rates: dict[str, list[float]] = {}
    for s in retryable["series"]:
        by_t = {p["t"]: p["n"] for p in s["points"]}
        rates[s["key"]] = [round(by_t.get(t, 0) / totals[t], 4) if totals[t] else 0.0
                           for t in labels]  # fmt: skip
    return labels, rates


def render_dashboard(data: dict[str, Any]) -> str:
    """The dashboard page from ``dashboard_data``'s result."""
    labels, rates = spurious_rate(data["category"], data["retryable"])
    rules = data["rule"]["series"]
    jobs = data["job_name"]["series"]
    runners = data["runner"]["series"]
    r = data["retries"]
    disputed = data["disputed"]
    charts = {
        "chart-spurious": {
            # Stacked bars: each category's share, the stack is the whole spurious rate.
            "type": "bar",
            "stacked": True,
            "labels": [t[:10] if data["bucket"] != "hour" else t[:13] for t in labels],
            "datasets": [
                {"label": k, "data": v, "backgroundColor": COLORS[i % len(COLORS)]}
                for i, (k, v) in enumerate(sorted(rates.items()))
            ],
        },
        "chart-rules": {
            "type": "bar",
            "labels": [s["key"] for s in rules],
            "datasets": [{"label": "failures", "data": [s["total"] for s in rules],
                          "backgroundColor": COLORS[0]}],
        },
        "chart-retries": {
            "type": "bar",
            "labels": ["requested", "issued", *(f"skipped: {k}" for k in sorted(r["skipped"]))],
            "datasets": [{"label": "decisions",
                          "data": [r["requested"], r["issued"],
                                   *(r["skipped"][k] for k in sorted(r["skipped"]))],
                          "backgroundColor": COLORS[1]}],
        },
        "chart-outcomes": {
            "type": "doughnut",
            "labels": ["passed", "failed"],
            "datasets": [{"label": "retry outcome", "data": [r["passed"], r["failed"]],
                          "backgroundColor": [COLORS[4], COLORS[2]]}],
        },
    }  # fmt: skip
    rate = "n/a" if r["success_rate"] is None else f"{r['success_rate']:.0%}"
    cats = data["category"]["series"]
    spurious_total = sum(s["total"] for s in data["retryable"]["series"])
    fails_total = data["category"]["total"]
    body = [
        f"<h1>Spurious failures — {escape(data['from'][:10])} to {escape(data['to'][:10])}"
        + (f" — {escape(data['project'])}" if data["project"] else "") + "</h1>",
        f"<p id=overview>{spurious_total} of {fails_total} classified failures were spurious "
        f"(retryable). Retries: {r['requested']} requested, {r['issued']} issued, "
        f"{sum(r['skipped'].values())} skipped; {r['passed']} passed, {r['failed']} failed "
        f"(success rate {rate}).</p>",
        "<h2>Spurious-failure rate over time by category</h2>",
        _chart("chart-spurious"),
        table(
            ["bucket", *sorted(rates)],
            ([t, *(f"{rates[k][i]:.1%}" for k in sorted(rates))] for i, t in enumerate(labels)),
            ident="table-spurious",
        ),
        table(["category", "failures"], ((s["key"], s["total"]) for s in cats),
              ident="table-categories"),
        "<div class=grid><div><h2>Top rules</h2>",
        _chart("chart-rules"),
        table(["rule", "failures"], ((s["key"], s["total"]) for s in rules), ident="table-rules"),
        "</div><div><h2>Top failing jobs</h2>",
        table(["job name", "failures"], ((s["key"], s["total"]) for s in jobs),
              ident="table-jobs"),
        "<h2>Top failing runners</h2>",
        table(["runner", "failures"], ((s["key"], s["total"]) for s in runners),
              ident="table-runners"),
        "</div></div>",
        "<div class=grid><div><h2>Retries issued vs skipped</h2>",
        _chart("chart-retries"),
        table(
            ["decision", "count"],
            [("requested", r["requested"]), ("issued", r["issued"]),
             ("CI call failed", r["call_failed"]),
             *((f"skipped: {k}", r["skipped"][k]) for k in sorted(r["skipped"]))],
            ident="table-retries",
        ),
        "</div><div><h2>Did the retries pass?</h2>",
        _chart("chart-outcomes"),
        table(["outcome", "count"], [("passed", r["passed"]), ("failed", r["failed"]),
                                     ("success rate", rate)], ident="table-outcomes"),
        "</div></div>",
        "<h2>Budget exhaustion</h2>",
        table(["reason", "skips"], sorted(r["budget_exhausted"].items()), ident="table-budget"),
        table(
            ["pipeline", "retries used", "limit", "jobs", "exhausted skips"],
            ((f"{p['source']}/{p['project']}#{p['pipeline_id']}", p["pipeline_retries"],
              p["pipeline_limit"], p["pipeline_jobs"], p["budget_exhausted"])
             for p in data["exhausted_pipelines"]),
            ident="table-budget-pipelines",
        ),
        "<h2>Disputed verdicts per rule</h2>",
        table(["rule", "disputed", "confirmed"],
              ((x["rule"], x["disputed"], x["confirmed"]) for x in disputed["rules"]),
              ident="table-disputed-rules"),
        table(
            ["job", "category", "rules", "who", "why", "should be"],
            ((f"<a href='{escape(job_href(d['source'], d['project'], d['job_id']))}'>"
              f"{escape(d['job_id'])}</a>" if d["job_id"] else "",
              d["category"], ", ".join(d["rules"]), d["who"], d["why"], d["correct_category"])
             for d in disputed["disputes"]),
            ident="table-disputes", raw=0,
        ),
        "<h2>Recent failed jobs</h2>",
        table(
            ["job", "name", "project", "category", "decision", "reason"],
            ((f"<a class=job-link href='{escape(job_href(j['source'], j['project'], j['job_id']))}'>"
              f"{escape(j['job_id'])}</a>", j["job_name"], j["project"], j["category"],
              _decision_cell(j), j["decision_reason"] or j["decision_action"])
             for j in data["recent"]),
            ident="table-recent", raw=0,
        ),
        "<script type='application/json' id='audit-charts'>"
        + json.dumps(charts).replace("</", "<\\/") + "</script>",
    ]  # fmt: skip
    return page("ciretry — spurious failures", "".join(body), scripts=True)


def _decision_cell(j: dict[str, Any]) -> str:
    """A request whose CI call failed for good is not "requested": say what became of it."""
    if j.get("decision") == "requested" and j.get("call_status") == "failed":
        return "requested, CI call failed"
    if j.get("decision") == "requested" and j.get("call_status") == "issued":
        return "retried"
    return str(j.get("decision") or "")


#: What a dispute may name as the right category.
CATEGORIES: Final = typing.get_args(Category)


def feedback_form(verdict_id: str, csrf: str | None, message: str = "") -> str:
    """Dispute or confirm a verdict: a form that posts with the session's CSRF token (None: the
    viewer may not give feedback, so a link to sign in with a token that may)."""
    if csrf is None:
        return (
            "<p id=feedback-sign-in>To dispute or confirm this verdict, "
            "<a href='/login'>sign in</a> with a feedback token.</p>"
        )
    options = "".join(f"<option value='{c}'>{c}</option>" for c in ("", *CATEGORIES))
    note = f"<p id=feedback-message>{escape(message)}</p>" if message else ""
    return (
        f"<h3>Your feedback</h3>{note}<form method=post action='/feedback' id=feedback-form>"
        f"<input type=hidden name=csrf value='{escape(csrf)}'>"
        f"<input type=hidden name=verdict_id value='{escape(verdict_id)}'>"
        "<label><input type=radio name=verdict value=disputed checked id=fb-disputed> wrong</label> "
        "<label><input type=radio name=verdict value=confirmed id=fb-confirmed> right</label> "
        "<label>who <input type=text name=who id=fb-who maxlength=200 required></label> "
        "<label>why <input type=text name=why id=fb-why maxlength=2000></label> "
        f"<label>should be <select name=correct_category id=fb-category>{options}</select></label> "
        "<button type=submit id=fb-send>Send</button></form>"
    )


def render_job(
    timeline: dict[str, Any], why: dict[str, Any], *, csrf: str | None = None, message: str = ""
) -> str:
    """A job's page; ``csrf``: the session's token when the viewer may give feedback."""
    j = timeline["job"]
    v = timeline["verdict"]
    d = timeline["decision"]
    parts = [
        f"<h1>Job {escape(j['job_id'])} — {escape(j['job_name'])}</h1>",
        f"<p>{escape(j['source'])} · {escape(j['project'])} · pipeline {escape(j['pipeline_id'])} · "
        f"status {escape(j['status'])} · runner {escape(j['runner'])}</p>",
        f"<h2>Why</h2><p class=summary id=why>{escape(why['summary'])}</p>",
    ]
    if v is not None:
        parts += [
            f"<h2>Verdict: {escape(v['category'])}</h2>",
            table(["retryable", "budget", "action", "confidence", "rules"],
                  [(str(v["retryable"]), v["budget"], v["action"], v["confidence"],
                    ", ".join(v["rules"]))], ident="table-verdict"),
            "<h3>Evidence</h3>",
            table(["rule", "line", "text", "signal"],
                  ((e.get("rule"), e.get("line"), e.get("text"), e.get("signal"))
                   for e in v["evidence"]), ident="table-evidence"),
            feedback_form(str(v["event_id"]), csrf, message),
        ]  # fmt: skip
    if d is not None:
        b = d["budget"]
        parts += [
            f"<h2>Decision: {escape(d['kind'])} {escape(d['action'] or '')}</h2>",
            table(["reason", "detail", "job retries", "pipeline retries", "pipeline jobs",
                   "deterministic failures", "policy"],
                  [(d["reason"] or "", d["detail"] or "", f"{b['job_attempts']} / {b['job_limit']}",
                    f"{b['pipeline_retries']} / {b['pipeline_limit']}", b["pipeline_jobs"],
                    b["deterministic_failures"], d["policy"] or "")], ident="table-decision"),
        ]  # fmt: skip
        if d.get("resources"):
            parts.append(table(list(d["resources"]), [list(d["resources"].values())],
                               ident="table-resources"))  # fmt: skip
    if timeline["feedback"]:
        parts += [
            "<h2>Feedback</h2>",
            table(["kind", "who", "why", "should be"],
                  ((f["kind"], f["who"], f["why"], f["correct_category"])
                   for f in timeline["feedback"]), ident="table-feedback"),
        ]  # fmt: skip
    parts += [
        "<h2>Timeline</h2>",
        table(
            ["position", "recorded at", "type", "stream", "data"],
            ((e["position"], e["recorded_at"], e["type"], e["stream"],
              "<pre>" + escape(json.dumps(e["data"], indent=1, sort_keys=True)) + "</pre>")
             for e in timeline["events"]),
            ident="table-events", raw=4,
        ),
    ]  # fmt: skip
    return page(f"job {j['job_id']}", "".join(parts))


def render_clusters(data: dict[str, Any]) -> str:
    """The "Unexplained failures" page from ``Audit.clusters``' result: one section per cluster,
    ranked by impact, with its lines, where it happens, its outcomes and a rule stub."""
    clusters = data["clusters"]
    title = "Unexplained failures" if data["unexplained"] else "Failure clusters"
    summary = table(
        ["#", "signature", "jobs", "pipelines", "commits", "people", "last 1d", "7d", "30d",
         "passed on retry", "failed again", "first seen", "last seen"],
        [
            [i + 1, f"<a href='#c{i + 1}'>{escape(c['signature'])}</a>",
             c["impact"]["jobs"], c["impact"]["pipelines"], c["impact"]["commits"],
             c["impact"]["people"], c["trend"]["1d"], c["trend"]["7d"], c["trend"]["30d"],
             c["outcomes"]["passed_on_retry"], c["outcomes"]["failed_again_same"],
             str(c["first_seen"])[:16], str(c["last_seen"])[:16]]
            for i, c in enumerate(clusters)
        ],
        ident="clusters",
        raw=1,
    )  # fmt: skip
    sections = []
    for i, c in enumerate(clusters):
        lines = "".join(f"<li><code>{escape(x)}</code></li>" for x in c["examples"])
        where = ", ".join(
            f"{label}: {escape(', '.join(c[key]) or '-')}"
            for label, key in (("jobs", "top_jobs"), ("runners", "top_runners"),
                               ("projects", "top_projects"))
        )  # fmt: skip
        o = c["outcomes"]
        rate = (
            "-"
            if o["pass_rate"] is None
            else f"{o['pass_rate']:.0%}, 95 % interval {o['pass_rate_low']:.0%}"
            f"–{o['pass_rate_high']:.0%}"
        )
        stub = (
            f"<details><summary>make this a rule</summary><pre class=stub>"
            f"{escape(c['rule_stub'])}</pre></details>"
            if c["rule_stub"]
            else ""
        )
        sections.append(
            f"<section id='c{i + 1}' class=cluster><h3>#{i + 1} "
            f"<code>{escape(c['signature'])}</code></h3>"
            f"<p>{c['impact']['jobs']} jobs in {c['impact']['pipelines']} pipelines, "
            f"{c['impact']['commits']} commits, {c['impact']['people']} people; {where}</p>"
            f"<p>outcomes: {o['passed_on_retry']} passed on retry, {o['failed_again_same']} "
            f"failed again, {o['failed_differently']} failed differently, "
            f"{o['never_retried']} never retried (pass rate {rate}); "
            f"{c['learned']} retried on what was learned</p>"
            f"<ul class=lines>{lines}</ul>{stub}</section>"
        )
    other = "?all=1" if data["unexplained"] else "?"
    toggle = "every cluster" if data["unexplained"] else "only the unexplained"
    body = (
        f"<h2 id=clusters-title>{escape(title)}</h2>"
        f"<p>Last {data['days']} days, by signature (the failure's decisive lines, normalized), "
        f"most pipelines first. <a href='/clusters{other}'>Show {toggle}</a>.</p>"
        f"{summary}{''.join(sections)}"
    )
    return page(title, body)


def _pipeline_text(p: dict[str, Any]) -> str:
    return f"{p['project']}#{p['pipeline_id']}"


def render_storms(data: dict[str, Any]) -> str:
    """The "Retry storms" page from ``Audit.storms``' result: one row per storm (open first),
    then each storm's pipelines and parked jobs."""
    storms = data["storms"]
    summary = table(
        ["#", "state", "signature", "category", "pipelines", "parked", "started", "last seen",
         "ended", "mode"],
        [
            [i + 1, s["state"] + (f" ({s['end_reason']})" if s["end_reason"] else ""),
             f"<a href='#s{i + 1}'>{escape(s['signature'])}</a>", s["category"],
             s["pipeline_count"], s["parked_count"], str(s["started_at"])[:19],
             str(s["last_seen"] or "")[:19], str(s["ended_at"] or "")[:19], s["mode"]]
            for i, s in enumerate(storms)
        ],
        ident="storms",
        raw=2,
    )  # fmt: skip
    sections = []
    for i, s in enumerate(storms):
        pipelines = ", ".join(escape(_pipeline_text(p)) for p in s["pipelines"])
        more = s["pipeline_count"] - len(s["pipelines"])
        jobs = "".join(
            f"<li><a href='{escape(job_href(j['source'], j['project'], j['job_id']))}'>"
            f"{escape(j['project'])} job {escape(j['job_id'])}</a> ({escape(j['job_name'])}, "
            f"pipeline {escape(j['pipeline_id'])})</li>"
            for j in s["parked"]
        )
        example = f"<p><code>{escape(s['example'])}</code></p>" if s["example"] else ""
        after = (
            f"; parked jobs retried over {s['jitter_s']:.0f} s after {s['quiet_s']:.0f} s of quiet"
            if s["state"] == "ended" and s["quiet_s"] is not None
            else ""
        )
        sections.append(
            f"<section id='s{i + 1}' class=storm><h3>#{i + 1} <code>{escape(s['storm_id'])}"
            f"</code></h3>{example}<p>opened at {s['threshold']} pipelines within "
            f"{s['window_s']:.0f} s{escape(after)}.</p>"
            f"<p>pipelines ({s['pipeline_count']}): {pipelines}"
            f"{f', and {more} more' if more > 0 else ''}</p>"
            f"<p>parked jobs ({s['parked_count']}):</p><ul class=parked>{jobs}</ul></section>"
        )
    body = (
        "<h2 id=storms-title>Retry storms</h2>"
        f"<p>Last {data['days']} days. A storm is one failure signature in many pipelines at "
        "once (a registry or mirror down, nodes reclaimed): while it lasts, act parks the "
        "retries of that signature without spending budget, and retries them, spread out, once "
        "the signature has been quiet ([storm] in the policy).</p>"
        f"{summary}{''.join(sections)}"
    )
    return page("Retry storms", body)


__all__ = [
    "CATEGORIES",
    "feedback_form",
    "job_href",
    "page",
    "render_clusters",
    "render_dashboard",
    "render_job",
    "render_storms",
    "spurious_rate",
    "table",
]
