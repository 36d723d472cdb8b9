"""What every normalizer returns, and typed access to untrusted JSON that names the bad field.

Normalizers are pure: ``(headers, parsed body) -> Accepted | Ignored`` or ``InvalidPayload``.
Every accessor here takes the JSON path it reads (``builds[2].id``) so that a 400 tells the sender
exactly which field was wrong, and so that a malformed payload can never escape as a KeyError or
TypeError (which the HTTP layer would otherwise have to turn into a 500).

Every text an event stores comes out of these accessors safe for PostgreSQL ``text`` and
``jsonb`` (one event that is not stalls every reader of the log), by one rule:

* **identifiers** (ids, project paths, namespaces: they name streams and idempotency keys) are
  *refused*, 400 naming the field, unless they are 1..200 printable characters without
  surrounding blanks (no U+0000, no lone surrogate, no control character): changing one would
  change which job it names;
* **free text** (names, refs, runners, labels, users, reasons, URLs, commit messages) is *kept
  and made safe*: U+0000 and lone surrogates become U+FFFD, and a value longer than its field's
  cap is cut there, ending in "…": 4096 characters for a commit ``message``, 2048 for a field
  whose name ends in ``url``, 1024 for any other unless the normalizer gives it a ``limit`` of
  its own (label names 255, ...); a list of text keeps its first 100 items.
  Refusing them instead would lose a real job over its name, and make GitLab disable the hook;
* timestamps, numbers and booleans are parsed: one that does not parse is a 400 naming it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ciretry.common.errors import MALFORMED_JSON
from ciretry.common.events import NewEvent
from ciretry.common.text import REPLACEMENT, safe_text


class InvalidPayload(Exception):
    """The payload cannot be normalized; ``field`` is the JSON path (or header) at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"error": "invalid_payload", "field": self.field, "message": self.message}


@dataclass(frozen=True, slots=True)
class Accepted:
    """Events to append. ``notes`` are things worth surfacing to the sender and the logs (e.g. a
    provider failure reason this code does not know yet)."""

    events: list[NewEvent]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Ignored:
    """A payload understood and deliberately not stored (non-terminal status, other event kind)."""

    reason: str


Result = Accepted | Ignored


# --- the body ---------------------------------------------------------------------------------

_decode = msgspec.json.Decoder().decode
#: A \\uD800-\\uDFFF escape: JSON's grammar allows one alone, msgspec refuses it.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def parse_json(raw: bytes) -> Any:
    """A body as JSON, or InvalidPayload on ``$``. A body whose only fault is a lone surrogate
    escape (``"\\ud800"``, valid JSON grammar, not valid Unicode) is parsed again by the
    standard library, so that the text rule decides what becomes of that string, as it does for
    a NUL: safe text in a free-text field, a 400 naming an identifier."""
    try:
        return _decode(raw)
    except MALFORMED_JSON as exc:
        if isinstance(exc, UnicodeDecodeError):
            raise InvalidPayload("$", f"malformed JSON: invalid UTF-8: {exc.reason}") from None
        if _SURROGATE_ESCAPE.search(raw):
            try:
                return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
            except (ValueError, RecursionError):
                pass
        raise InvalidPayload("$", f"malformed JSON: {exc}") from None
    except RecursionError:
        raise InvalidPayload("$", "JSON nested too deeply") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# --- headers ----------------------------------------------------------------------------------


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup for plain dicts (aiohttp's CIMultiDict already is)."""
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        for key, v in headers.items():
            if key.lower() == lowered:
                return v
    return value


# --- typed access -----------------------------------------------------------------------------

#: Longest identifier accepted: ids end up in stream names and idempotency keys (text columns),
#: so they must stay short and free of NUL, which PostgreSQL refuses in text.
MAX_IDENT = 200
#: Caps of free text (characters), by field name: see the module doc.
MAX_SHORT_TEXT = 1024
MAX_URL = 2048
MAX_MESSAGE = 4096
MAX_LIST_ITEMS = 100


def cap_for(key: str) -> int:
    """The cap of a free-text field, from its JSON name."""
    if key == "message":
        return MAX_MESSAGE
    if key.lower().endswith("url"):
        return MAX_URL
    return MAX_SHORT_TEXT


def text(value: str, key: str, limit: int | None = None) -> str:
    """Free text from the field ``key``, made safe for PostgreSQL and cut at ``limit`` or, by
    default, at the cap its name gets (module doc)."""
    return safe_text(value, cap_for(key) if limit is None else limit)


def obj(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise InvalidPayload(path or "$", f"expected an object, got {_kind(value)}")
    return value


def opt_obj(parent: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any] | None:
    value = parent.get(key)
    if value is None:
        return None
    return obj(value, _join(path, key))


def opt_list(parent: Mapping[str, Any], key: str, path: str) -> Sequence[Any]:
    value = parent.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidPayload(_join(path, key), f"expected an array, got {_kind(value)}")
    return value


def req_ident(parent: Mapping[str, Any], key: str, path: str) -> str:
    """A required id: a non-negative integer or a short string, returned as text."""
    value = opt_ident(parent, key, path)
    if value is None:
        raise InvalidPayload(_join(path, key), "required")
    return value


def opt_ident(parent: Mapping[str, Any], key: str, path: str) -> str | None:
    value = parent.get(key)
    if value is None:
        return None
    return ident(value, _join(path, key))


def ident(value: Any, path: str) -> str:
    if isinstance(value, bool):
        raise InvalidPayload(path, "expected an id, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise InvalidPayload(path, "expected a non-negative id")
        return str(value)
    if isinstance(value, str):
        # isprintable() is False for NUL, lone surrogates and every other control character;
        # U+FFFD is what free text turns those into, so ident(req_str(...)) refuses them too.
        if (
            not value
            or len(value) > MAX_IDENT
            or not value.isprintable()
            or REPLACEMENT in value
            or value.strip() != value
        ):
            raise InvalidPayload(path, f"expected an id of 1..{MAX_IDENT} printable characters")
        return value
    raise InvalidPayload(path, f"expected an id, got {_kind(value)}")


def req_str(parent: Mapping[str, Any], key: str, path: str) -> str:
    value = opt_str(parent, key, path)
    if value is None:
        raise InvalidPayload(_join(path, key), "required")
    return value


def opt_str(
    parent: Mapping[str, Any], key: str, path: str, *, limit: int | None = None
) -> str | None:
    """Free text: safe for PostgreSQL and cut at ``limit`` characters, by default at the cap
    the field's name gets (module doc). Never refused for its content or length."""
    value = parent.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidPayload(_join(path, key), f"expected a string, got {_kind(value)}")
    return text(value, key, limit)


def opt_str_of(
    parent: Mapping[str, Any] | None, key: str, path: str, *, limit: int | None = None
) -> str | None:
    """``opt_str`` on an optional object (None when the object is absent)."""
    return None if parent is None else opt_str(parent, key, path, limit=limit)


def opt_time_of(parent: Mapping[str, Any] | None, key: str, path: str) -> dt.datetime | None:
    return None if parent is None else opt_time(parent, key, path)


def opt_int(parent: Mapping[str, Any], key: str, path: str) -> int | None:
    value = parent.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPayload(_join(path, key), f"expected an integer, got {_kind(value)}")
    if not -(2**31) <= value < 2**31:
        raise InvalidPayload(_join(path, key), "integer out of range")
    return value


def opt_bool(parent: Mapping[str, Any], key: str, path: str) -> bool | None:
    value = parent.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise InvalidPayload(_join(path, key), f"expected a boolean, got {_kind(value)}")
    return value


def str_list(parent: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    """A list of free text: each item made safe and capped, the first MAX_LIST_ITEMS kept."""
    out: list[str] = []
    for i, item in enumerate(opt_list(parent, key, path)):
        if not isinstance(item, str):
            raise InvalidPayload(
                f"{_join(path, key)}[{i}]", f"expected a string, got {_kind(item)}"
            )
        if i < MAX_LIST_ITEMS:
            out.append(text(item, key))
    return tuple(out)


# GitLab alone sends "2016-08-12 15:23:28 UTC", "2021-02-23T02:41:37.886Z" and "...+02:00".
_UTC_SUFFIX = re.compile(r"\s*(UTC|Z)$")


def opt_time(parent: Mapping[str, Any], key: str, path: str) -> dt.datetime | None:
    value = parent.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise InvalidPayload(_join(path, key), f"expected a timestamp string, got {_kind(value)}")
    return parse_time(value, _join(path, key))


def parse_time(value: str, path: str) -> dt.datetime:
    text = value.strip()
    if text.endswith(("UTC", "Z")):  # cheap test first: this runs for every webhook
        text = _UTC_SUFFIX.sub("", text) + "+00:00"
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidPayload(path, f"not an ISO 8601 timestamp: {value[:40]!r}") from None
    if parsed.tzinfo is None:
        # Providers that omit the zone mean UTC (GitLab's API and hooks are UTC).
        parsed = parsed.replace(tzinfo=dt.UTC)
    try:
        # Normalized to UTC here, so a timestamp at the edge of the calendar (year 1 with a
        # positive offset, year 9999 with a negative one) is refused now, not later by an
        # overflow in a key, the database or a projection.
        return parsed.astimezone(dt.UTC)
    except (OverflowError, ValueError):
        raise InvalidPayload(path, f"timestamp out of range: {value[:40]!r}") from None


def content_hash(*parts: Any) -> str:
    """Stable hash of JSON-encodable parts, for idempotency keys when a source gives no id."""
    return hashlib.sha256(msgspec.json.encode(parts, order="sorted")).hexdigest()[:32]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --- provider ids -----------------------------------------------------------------------------
#
# Ids end up in stream names, idempotency keys, audit queries and provider API calls: an id the
# provider could never have sent (GitLab build_id "abc") would be stored, counted in the stats
# and then answered 404 by the API. Each provider's ids are checked against what it defines.

#: Taskcluster's slugid (a v4 UUID in URL-safe base64), the pattern its own schemas use.
_SLUGID = re.compile(r"[A-Za-z0-9_-]{8}[Q-T][A-Za-z0-9_-][CGKOSWaeimquy26-][A-Za-z0-9_-]{10}[AQgw]")
#: A UUID as Buildkite writes its job ids (``b63254c0-3271-4a98-8270-7cfbd6c2f14e``).
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
#: A Buildkite organization or pipeline slug, as it appears in the REST API's paths.
_BUILDKITE_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: GitHub's ``owner/repo`` (``repository.full_name``).
_GITHUB_REPO = re.compile(r"[A-Za-z0-9-]+/[A-Za-z0-9_.-]+")


def number_id(value: Any, path: str) -> str:
    """An id the provider defines as an integer (GitLab's and GitHub's): a non-negative integer,
    or its decimal digits as a string."""
    text = ident(value, path)
    if not (text.isascii() and text.isdigit()):
        raise InvalidPayload(path, f"expected a numeric id, got {text[:40]!r}")
    return text


def req_number_id(parent: Mapping[str, Any], key: str, path: str) -> str:
    if parent.get(key) is None:
        raise InvalidPayload(_join(path, key), "required")
    return number_id(parent[key], _join(path, key))


def opt_number_id(parent: Mapping[str, Any], key: str, path: str) -> str | None:
    value = parent.get(key)
    return None if value is None else number_id(value, _join(path, key))


def slug_id(value: Any, path: str) -> str:
    """A Taskcluster taskId or taskGroupId."""
    text = ident(value, path)
    if not _SLUGID.fullmatch(text):
        raise InvalidPayload(path, f"expected a Taskcluster slugid, got {text[:40]!r}")
    return text


def github_repo(value: Any, path: str) -> str:
    text = ident(value, path)
    if not _GITHUB_REPO.fullmatch(text):
        raise InvalidPayload(path, f"expected owner/repo, got {text[:80]!r}")
    return text


def uuid_id(value: Any, path: str) -> str:
    """A Buildkite job id."""
    text = ident(value, path)
    if not _UUID.fullmatch(text):
        raise InvalidPayload(path, f"expected a UUID, got {text[:40]!r}")
    return text.lower()


def buildkite_slug(value: Any, path: str) -> str:
    """A Buildkite organization or pipeline slug."""
    text = ident(value, path)
    if not _BUILDKITE_SLUG.fullmatch(text):
        raise InvalidPayload(path, f"expected a Buildkite slug, got {text[:80]!r}")
    return text
