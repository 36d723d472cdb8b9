"""Security review: one module checks every presented credential (``ciretry.common.auth``).

The primitives, pure: token sets (several tokens for rotation, every one compared), per-project
tokens, HMAC signatures (GitHub's, Buildkite's timestamped one), bearer parsing, and the named scopes with today's open/closed rules.
Then, over the source of ``libs/`` and ``services/``: no other module compares a credential
(``hmac.compare_digest`` or ``==`` on a token, secret or signature).
"""

from __future__ import annotations

import ast
import hashlib
import hmac
from pathlib import Path

import pytest

from ciretry.common.auth import (
    ADMIN,
    FEEDBACK,
    PUSH,
    READ,
    SCOPES,
    ProjectTokens,
    Scope,
    TokenSet,
    bearer,
    buildkite_signature_ok,
    fingerprint,
    scopes,
    signature_ok,
)
from ciretry.common.config import Config

ROOT = Path(__file__).resolve().parents[2]
AUTH_MODULE = "libs/common/ciretry/common/auth.py"
SOURCES = sorted(p for d in ("libs", "services") for p in (ROOT / d).rglob("*.py"))
#: Names a presented or configured credential goes by in the code base.
CREDENTIAL_NAMES = frozenset(
    {"token", "tokens", "presented", "secret", "secrets", "signature", "given", "expected"}
)


# --- token sets ---------------------------------------------------------------------------


def test_a_token_set_accepts_each_of_its_tokens_and_nothing_else() -> None:
    tokens = TokenSet.of("old-token", "new-token")
    assert tokens.configured
    assert tokens.matches("old-token") and tokens.matches("new-token")
    for wrong in ("", "old-token ", "OLD-TOKEN", "old", "new-tokenx", "é" * 9, "\udcff"):
        assert not tokens.matches(wrong), wrong
    assert not tokens.matches(None)


def test_an_empty_token_set_accepts_nothing() -> None:
    tokens = TokenSet.of("", "")
    assert not tokens.configured
    assert not tokens.matches("") and not tokens.matches(None) and not tokens.matches("x")


def test_every_token_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """No short-circuit: the time taken does not say which token matched."""
    from ciretry.common import auth

    seen: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        seen.append(b)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    tokens = TokenSet.of("a-token", "b-token", "c-token")
    assert tokens.matches("a-token")
    assert seen == [b"a-token", b"b-token", b"c-token"]


# --- per-project tokens (GitLab webhook secrets) ------------------------------------------


def test_project_tokens_parse_global_and_scoped_entries() -> None:
    parsed = ProjectTokens.parse(["everywhere", "project:42:only-42", "project:42:also-42", ""])
    assert parsed.configured and parsed.has_project_tokens
    assert parsed.matches_everywhere("everywhere")
    assert not parsed.matches_everywhere("only-42")
    assert parsed.matches_project("only-42", "42") and parsed.matches_project("also-42", "42")
    assert not parsed.matches_project("only-42", "43")
    assert not parsed.matches_project("only-42", None)
    assert not parsed.matches_project("everywhere", "42")


@pytest.mark.parametrize("entry", ["project:", "project::x", "project:7:", "project:7"])
def test_malformed_project_entries_are_global_secrets(entry: str) -> None:
    """As before the move: an entry that is not ``project:<id>:<secret>`` is taken whole."""
    parsed = ProjectTokens.parse([entry])
    assert parsed.matches_everywhere(entry)
    assert not parsed.has_project_tokens


def test_no_secrets_is_not_configured() -> None:
    parsed = ProjectTokens.parse([])
    assert not parsed.configured and not parsed.matches_everywhere("")


# --- signatures (GitHub) -----------------------------------------------------------------


def _sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def test_a_signature_by_any_secret_is_accepted() -> None:
    secrets = TokenSet.of("first", "second")
    body = b'{"action": "completed"}'
    assert signature_ok(secrets, body, _sign(b"first", body))
    assert signature_ok(secrets, body, _sign(b"second", body))
    assert signature_ok(secrets, body, _sign(b"second", body).upper().replace("SHA256", "sha256"))
    assert signature_ok(secrets, body, _sign(b"first", body) + "  ")


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        "sha256=",
        "sha1=" + "0" * 40,
        "SHA256=" + "0" * 64,
        "sha256=zz",
        "sha256=" + "é" * 64,
    ],
)
def test_bad_signatures_are_refused(signature: str | None) -> None:
    assert not signature_ok(TokenSet.of("first"), b"{}", signature)


def test_a_signature_of_another_body_or_secret_is_refused() -> None:
    secrets = TokenSet.of("first")
    assert not signature_ok(secrets, b"{}", _sign(b"first", b"{ }"))
    assert not signature_ok(secrets, b"{}", _sign(b"wrong", b"{}"))
    assert not signature_ok(TokenSet.of(), b"{}", _sign(b"", b"{}"))


# --- signatures (Buildkite) --------------------------------------------------------------

NOW = 1_619_071_700.0


def _buildkite(secret: bytes, body: bytes, stamp: int = int(NOW)) -> str:
    mac = hmac.new(secret, f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"timestamp={stamp},signature={mac}"


def test_a_buildkite_signature_by_any_secret_is_accepted() -> None:
    secrets = TokenSet.of("first", "second")
    body = b'{"event": "job.finished"}'
    assert buildkite_signature_ok(secrets, body, _buildkite(b"first", body), NOW)
    assert buildkite_signature_ok(secrets, body, _buildkite(b"second", body), NOW)
    # Blanks around the parts, as Buildkite's own example verifier strips them.
    spaced = _buildkite(b"second", body).replace(",", " , ")
    assert buildkite_signature_ok(secrets, body, spaced, NOW)
    # Within the allowed skew, either way.
    assert buildkite_signature_ok(secrets, body, _buildkite(b"first", body, int(NOW) - 299), NOW)
    assert buildkite_signature_ok(secrets, body, _buildkite(b"first", body, int(NOW) + 299), NOW)


def test_a_replayed_or_forged_buildkite_signature_is_refused() -> None:
    secrets = TokenSet.of("first")
    body = b"{}"
    old = int(NOW) - 301
    assert not buildkite_signature_ok(secrets, body, _buildkite(b"first", body, old), NOW)
    assert not buildkite_signature_ok(secrets, b"{ }", _buildkite(b"first", body), NOW)
    assert not buildkite_signature_ok(secrets, body, _buildkite(b"wrong", body), NOW)
    # The timestamp is signed: moving it to look fresh breaks the signature.
    moved = _buildkite(b"first", body, old).replace(f"timestamp={old}", f"timestamp={int(NOW)}")
    assert not buildkite_signature_ok(secrets, body, moved, NOW)
    assert not buildkite_signature_ok(TokenSet.of(), body, _buildkite(b"", body), NOW)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "signature=" + "0" * 64,
        f"timestamp={int(NOW)}",
        f"timestamp={int(NOW)},signature=",
        "timestamp=soon,signature=" + "0" * 64,
        "timestamp=١٦١٩٠٧١٧٠٠,signature=" + "0" * 64,
        f"timestamp={int(NOW)},signature=" + "é" * 64,
        "sha256=" + "0" * 64,
    ],
)
def test_malformed_buildkite_signatures_are_refused(header: str | None) -> None:
    assert not buildkite_signature_ok(TokenSet.of("first"), b"{}", header, NOW)


# --- bearer tokens and scopes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER   abc  ", "abc"),
        ("Bearer ", ""),
        ("Bearer", None),
        ("Bearerabc", None),
        ("Basic abc", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_parsing(header: str | None, token: str | None) -> None:
    assert bearer(header) == token


READER, READER2 = "reader-token-0123456789", "reader-token-rotated-0123"
GIVER, PUSHER, ADMIN_TOKEN = (
    "feedback-token-012345",
    "push-token-0123456789",
    "admin-token-0123456789",
)
#: Who each token lets in: a scope accepts only its own tokens and those of scopes that include
#: it (feedback and admin read; admin gives feedback); push is nobody else's.
ALLOWED = {
    READER: {READ},
    READER2: {READ},
    GIVER: {READ, FEEDBACK},
    PUSHER: {PUSH},
    ADMIN_TOKEN: {READ, FEEDBACK, ADMIN},
}


def _scoped(**overrides: object) -> Config:
    settings: dict[str, object] = {
        "read_tokens": (READER, READER2),
        "feedback_tokens": (GIVER,),
        "push_tokens": (PUSHER,),
        "admin_tokens": (ADMIN_TOKEN,),
    }
    settings.update(overrides)
    return Config(**settings)  # type: ignore[arg-type]


def test_each_scope_takes_its_own_tokens_and_no_others() -> None:
    s = scopes(_scoped())
    for token, allowed in ALLOWED.items():
        for name in SCOPES:
            assert s[name].allows(token) is (name in allowed), (token, name)
    for name in SCOPES:
        assert not s[name].is_open, name
        for wrong in (None, "", READER + "x", READER[:-1], "anything"):
            assert not s[name].allows(wrong), (name, wrong)


def test_closed_by_default() -> None:
    """No token configured: every scope refuses everyone; ``api_open`` opens reading only."""
    s = scopes(Config())
    for name in SCOPES:
        assert s[name].closed and not s[name].allows(None) and not s[name].allows("x"), name
    opened = scopes(Config(api_open=True))
    assert opened[READ].is_open and opened[READ].allows(None)
    for name in (FEEDBACK, PUSH, ADMIN):
        assert not opened[name].allows(None) and not opened[name].allows("x"), name


def test_the_deprecated_api_token_reads_gives_feedback_and_pushes_but_is_no_admin() -> None:
    s = scopes(Config(api_token="api-s3cret"))
    for name in (READ, FEEDBACK, PUSH):
        assert s[name].allows("api-s3cret"), name
        assert not s[name].allows("api-s3cretx") and not s[name].allows(None), name
    assert not s[ADMIN].allows("api-s3cret")


def test_a_session_fingerprint_names_a_token_and_ends_with_it() -> None:
    key = b"k" * 32
    s = scopes(_scoped())
    fp = fingerprint(key, GIVER)
    assert GIVER not in fp and fp != fingerprint(b"other-key", GIVER)
    assert s[READ].allows_fingerprint(key, fp) and s[FEEDBACK].allows_fingerprint(key, fp)
    assert not s[PUSH].allows_fingerprint(key, fp) and not s[ADMIN].allows_fingerprint(key, fp)
    assert not s[READ].allows_fingerprint(b"other-key", fp)
    assert not s[READ].allows_fingerprint(key, GIVER)  # the token itself is no fingerprint
    rotated = scopes(_scoped(feedback_tokens=("feedback-token-new-0123",)))
    assert not rotated[FEEDBACK].allows_fingerprint(key, fp)


def test_scoped_tokens_too_short_are_refused_without_showing_them() -> None:
    from ciretry.common.config import ConfigError, load_config

    with pytest.raises(ConfigError) as caught:
        load_config({"CIRETRY_PUSH_TOKENS": "good-token-0123456789,short1"})
    assert "CIRETRY_PUSH_TOKENS" in str(caught.value) and "short1" not in str(caught.value)
    config = load_config(
        {"CIRETRY_READ_TOKENS": f" {READER} , {READER2} ", "CIRETRY_API_OPEN": "true"}
    )
    assert config.read_tokens == (READER, READER2) and config.api_open


def test_a_closed_scope_without_tokens_lets_no_one_in() -> None:
    closed = Scope("admin", TokenSet())
    assert closed.closed and not closed.is_open
    assert not closed.allows("") and not closed.allows(None)


# --- no other module compares credentials ------------------------------------------------


def _findings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "compare_digest":
            out.append(f"{path.name}:{node.lineno}: compare_digest")
        elif isinstance(node, ast.Compare) and any(
            isinstance(op, ast.Eq | ast.NotEq) for op in node.ops
        ):
            names = {
                n.id if isinstance(n, ast.Name) else n.attr
                for n in (node.left, *node.comparators)
                if isinstance(n, ast.Name | ast.Attribute)
            }
            if names & CREDENTIAL_NAMES:
                out.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_no_module_but_auth_compares_a_credential() -> None:
    assert SOURCES
    found = [
        f for path in SOURCES if str(path.relative_to(ROOT)) != AUTH_MODULE for f in _findings(path)
    ]
    assert not found, found


def test_auth_compares_only_in_constant_time() -> None:
    findings = _findings(ROOT / AUTH_MODULE)
    assert findings and all(f.endswith("compare_digest") for f in findings), findings


def test_the_scanner_finds_a_plain_compare(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def ok(token, given):\n    return given == token\n")
    assert _findings(probe)
