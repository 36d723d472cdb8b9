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
    READ,
    WEBHOOKS,
    ProjectTokens,
    Scope,
    TokenSet,
    bearer,
    buildkite_signature_ok,
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


def test_todays_scopes_with_a_token() -> None:
    s = scopes(Config(api_token="api-s3cret"))
    for name in (WEBHOOKS, READ):
        assert s[name].allows("api-s3cret"), name
        assert not s[name].allows("api-s3cretx") and not s[name].allows(None), name


def test_todays_scopes_without_a_token() -> None:
    """Webhooks without a scheme of their own are closed, the read API is open (issue 18 will
    change the defaults; this pins today's)."""
    s = scopes(Config(api_token=""))
    assert not s[WEBHOOKS].allows(None) and not s[WEBHOOKS].allows("")
    assert not s[WEBHOOKS].allows("anything")
    assert s[READ].is_open and s[READ].allows(None) and s[READ].allows("anything")


def test_a_closed_scope_without_tokens_lets_no_one_in() -> None:
    closed = Scope("admin", TokenSet())
    assert not closed.is_open and not closed.allows("") and not closed.allows(None)


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
