"""The imaging protocol's pure parts (docs/imaging-protocol.md), both halves: imgsrvd (the
server) and img (the client, img/client.py) import them. Image paths, request bodies, answers,
header names; the client's side of them too (server names, image URLs, referrals and refusals
as the client reads them). No sockets, no files: strings and dicts in, typed values or a reason
out.

Image paths are relative to ImageRoot and written with '/'. A path of the form //server/path
names an image on another imaging server (the original's referral form); parse_image_path tells
the two apart, and refers a //server/path naming this server back to a local path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from common.identity import BadIdentity, MachineIdentity, identity_from_wire, identity_to_wire
from common.machine import ATTRIBUTE_KINDS, MachineFacts, facts_from_strings

from .filesets import MAX_SETS

VERSION = 1
IMAGES_PREFIX = "/v1/images/"
MAX_PATH = 1024
MAX_COMPONENT = 255
MODES = ("auto", "manual")
OPERATIONS = ("upload", "download")
STATUSES = ("success", "failure")
IMAGE_TYPES = ("base", "addon")
WORKSTATION_HEADER = "X-Preboot-Workstation"
MODE_HEADER = "X-Preboot-Mode"
# One value per img run, on every request and in its result reports: the server tells the
# requests of one retrieve apart from another client's, and joins its record of a store or
# retrieve with the engine's report of it (one results log entry per operation).
SESSION_HEADER = "X-Preboot-Session"
MAX_SESSION = 64
# "yes": this run reports its result to this server (it reports to the one it was pointed at,
# not to one a referral sent it to), so the server's record of the operation waits for it.
REPORTS_HEADER = "X-Preboot-Reports"
# A refusal's reason also goes in this header: a HEAD answer has no body to carry it.
ERROR_HEADER = "X-Preboot-Error"
DEFAULT_PORT = 998                 # a //server/path without a port names this port

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SERVER = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.\-]*[A-Za-z0-9])?(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
MANUAL_REFERRAL_ERROR = ("the image is on another imaging server ({server}); a request for an "
                         "image on a different imaging server is denied in manual imaging mode "
                         "(referrals are made only in auto-imaging mode): connect to {server} "
                         "directly")


class BadPath(ValueError):
    """An image path that is refused; str() is the reason, safe to show the client."""


class BadRequest(ValueError):
    """A request body that cannot be used; str() is the reason."""


@dataclass(frozen=True)
class LocalPath:
    path: str                    # normalised, relative to ImageRoot, '/'-separated


@dataclass(frozen=True)
class RemotePath:
    server: str                  # host[:port] of the other imaging server
    path: str                    # the path on that server, relative to its ImageRoot

    def __str__(self) -> str:
        return f"//{self.server}/{self.path}"


def clean_relative(text: str) -> str:
    """A path relative to ImageRoot, normalised ('a//b/./c' -> 'a/b/c'), or BadPath: absolute
    paths, '..', control characters, backslashes and hidden names (a leading '.', which is also
    how uploads in progress are named) are refused."""
    if not text:
        raise BadPath("empty image path")
    if len(text) > MAX_PATH:
        raise BadPath(f"image path longer than {MAX_PATH} characters")
    if _CONTROL.search(text):
        raise BadPath("control characters in the image path")
    if "\\" in text:
        raise BadPath("backslash in the image path (use '/')")
    if text.startswith("/"):
        raise BadPath("absolute image path (paths are relative to the image root)")
    parts = []
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise BadPath("'..' in the image path")
        if part.startswith("."):
            raise BadPath(f"hidden name '{part}' in the image path")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT:
            raise BadPath(f"a name in the image path is longer than {MAX_COMPONENT} bytes")
        parts.append(part)
    if not parts:
        raise BadPath("empty image path")
    return "/".join(parts)


def parse_image_path(text: str, own_names: tuple[str, ...] = ()) -> LocalPath | RemotePath:
    """'lab/base.img' -> LocalPath; '//server/lab/base.img' -> RemotePath, or LocalPath when
    `server` is one of own_names (compared case-insensitively)."""
    if text.startswith("//"):
        server, sep, rest = text[2:].partition("/")
        if not server or not _SERVER.fullmatch(server):
            raise BadPath(f"'{server[:100]}' is not a server name")
        if not sep:
            raise BadPath("no image path after the server name")
        path = clean_relative(rest)
        if server.lower() in {name.lower() for name in own_names if name}:
            return LocalPath(path)
        return RemotePath(server, path)
    return LocalPath(clean_relative(text))


def path_from_url(raw_path: str, own_names: tuple[str, ...] = ()) -> LocalPath | RemotePath:
    """The image path of a /v1/images/<path> request, from the raw (still percent-encoded)
    URL path: /v1/images/lab/base.img and /v1/images/lab%2Fbase.img are lab/base.img;
    /v1/images//srv/x.img and /v1/images/%2F%2Fsrv%2Fx.img are //srv/x.img (another server)."""
    raw = raw_path.split("?", 1)[0]
    if not raw.startswith(IMAGES_PREFIX):
        raise BadPath("not an image URL")
    rest = raw[len(IMAGES_PREFIX) - 1:]          # keeps the "/" after /v1/images
    try:
        if rest.startswith("//"):
            text = "//" + unquote(rest[2:], errors="strict")
        else:
            text = unquote(rest[1:], errors="strict")
    except UnicodeDecodeError:
        raise BadPath("image path is not UTF-8") from None
    return parse_image_path(text, own_names)


def upload_allowed(path: str, allowed_dirs: tuple[str, ...]) -> bool:
    """Whether `path` (clean, relative) lies in one of allowed_dirs (clean, relative; '' is
    the root itself). An empty list allows everything under the root."""
    if not allowed_dirs:
        return True
    for folder in allowed_dirs:
        if folder == "" or path.startswith(folder + "/"):
            return True
    return False


def _text(value: Any, name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadRequest(f"{name}: must be a string or a whole number")
    return str(value)


IDENTITY_SOURCES = ("disk", "policy")   # the work answer's identity_source
MAX_IDENTITY_TEXT = 4096   # a result's identity: what img applied (describe() and the lines per system)


@dataclass(frozen=True)
class WorkRequest:
    facts: MachineFacts
    mode: str                    # auto or manual
    identity: MachineIdentity | None = None   # the one img read from the disk's image-safe data


def parse_identity(value: Any, field: str = "identity") -> MachineIdentity:
    """An identity in its wire form (common.identity); BadRequest naming the field."""
    try:
        return identity_from_wire(value)
    except BadIdentity as exc:
        text = str(exc)
        raise BadRequest(text if text.startswith(field) else f"{field}.{text}") from None


def identity_fields(identity: MachineIdentity | None, source: str) -> dict[str, Any]:
    """The work answer's identity fields: none when no identity policy applies."""
    if identity is None or not source:
        return {}
    return {"identity": identity_to_wire(identity), "identity_source": source}


def answer_identity(answer: Any) -> tuple[MachineIdentity | None, str]:
    """The client's side: the identity a work answer carries and its source ("disk" or
    "policy"), or (None, "") when it carries none; BadRequest for a malformed one."""
    if not isinstance(answer, dict) or answer.get("identity") is None:
        return None, ""
    source = answer.get("identity_source")
    if source not in IDENTITY_SOURCES:
        raise BadRequest(f"identity_source: one of {', '.join(IDENTITY_SOURCES)}")
    return parse_identity(answer["identity"]), source


def parse_work_request(body: Any) -> WorkRequest:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object of machine facts")
    mode = body.get("mode", "auto")
    if mode not in MODES:
        raise BadRequest(f"mode: '{mode}' is not auto or manual")
    values = {}
    identity = None
    if body.get("identity") is not None:
        identity = parse_identity(body["identity"])
    for name, value in body.items():
        if name in ("mode", "identity"):
            continue
        if name not in ATTRIBUTE_KINDS:
            raise BadRequest(f"{name}: not a machine attribute")
        values[name] = _text(value, name)
    facts, problems = facts_from_strings(values)
    if problems:
        raise BadRequest("; ".join(problems))
    if facts.mac is None:
        raise BadRequest("mac: required")
    return WorkRequest(facts, mode, identity)


@dataclass(frozen=True)
class ResultReport:
    workstation: str
    mac: str | None
    operation: str
    image_type: str
    image_path: str
    status: str
    error_message: str
    session: str = ""       # the X-Preboot-Session of the run that did the operation
    multicast: "MulticastResult | None" = None   # a multicast receiver's result
    identity: str = ""      # the identity applied (MachineIdentity.describe()), or ""


# What a multicast receiver's report may say it took (docs/multicast.md, "Results").
MULTICAST_PATHS = ("multicast", "multicast+unicast", "failed")
MULTICAST_FIELDS = ("multicast_session", "digest", "chunks_verified", "bytes_written", "path")


@dataclass(frozen=True)
class MulticastResult:
    """The multicast fields of a result: the session, the image digest the receiver restored
    (hex), the chunks it verified, the bytes it wrote and the path it took."""

    session: str
    digest: str
    chunks_verified: int
    bytes_written: int
    path: str


def clean_session(value: str) -> str:
    """A session as sent (printable ASCII, at most MAX_SESSION characters), else ''."""
    value = value.strip()
    if len(value) > MAX_SESSION or not value.isascii() or not value.isprintable():
        return ""
    return value


def parse_result(body: Any) -> ResultReport:
    from common.machine import normalize_mac

    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    fields = {}
    for name in ("workstation", "mac", "operation", "image_type", "image_path", "status",
                 "error_message", "session"):
        value = body.get(name, "")
        if not isinstance(value, str):
            raise BadRequest(f"{name}: must be a string")
        if len(value) > 4096:
            raise BadRequest(f"{name}: longer than 4096 characters")
        fields[name] = value.strip()
    identity = body.get("identity", "")
    if not isinstance(identity, str) or len(identity) > MAX_IDENTITY_TEXT:
        raise BadRequest(f"identity: a string of at most {MAX_IDENTITY_TEXT} characters")
    unknown = sorted(set(body) - set(fields) - set(MULTICAST_FIELDS) - {"identity"})
    if unknown:
        raise BadRequest(f"{unknown[0]}: not a result field")
    mac = None
    if fields["mac"]:
        mac = normalize_mac(fields["mac"])
        if mac is None:
            raise BadRequest(f"mac: '{fields['mac']}' is not a MAC address")
    if not fields["workstation"] and mac is None:
        raise BadRequest("workstation or mac: required")
    if fields["operation"] not in OPERATIONS:
        raise BadRequest(f"operation: '{fields['operation']}' is not upload or download")
    if fields["status"] not in STATUSES:
        raise BadRequest(f"status: '{fields['status']}' is not success or failure")
    image_type = fields["image_type"] or "base"
    if image_type not in IMAGE_TYPES:
        raise BadRequest(f"image_type: '{image_type}' is not base or addon")
    if fields["session"] and not clean_session(fields["session"]):
        raise BadRequest(f"session: not printable ASCII of at most {MAX_SESSION} characters")
    multicast = _multicast_result(body, fields["operation"], mac)
    return ResultReport(fields["workstation"] or (mac or ""), mac, fields["operation"],
                        image_type, fields["image_path"], fields["status"],
                        fields["error_message"], fields["session"], multicast,
                        identity.strip())


def _multicast_result(body: dict[str, Any], operation: str, mac: str | None
                      ) -> MulticastResult | None:
    if not any(name in body for name in MULTICAST_FIELDS):
        return None
    session = body.get("multicast_session")
    if not isinstance(session, str) or not session or \
            len(session.encode("utf-8", "surrogatepass")) > 255 or _CONTROL.search(session):
        raise BadRequest("multicast_session: 1 to 255 bytes of text, required with the "
                         "multicast fields")
    if operation != "download":
        raise BadRequest("multicast_session: goes only with operation download")
    if mac is None:
        raise BadRequest("mac: required with multicast_session")
    digest = body.get("digest", "")
    if not isinstance(digest, str) or not re.fullmatch(r"(?:[0-9a-fA-F]{32})?", digest):
        raise BadRequest("digest: the image digest as 32 hex digits, or empty")
    counts = []
    for name in ("chunks_verified", "bytes_written"):
        value = body.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
            raise BadRequest(f"{name}: a whole number, at least 0")
        counts.append(value)
    path = body.get("path", "")
    if path not in MULTICAST_PATHS:
        raise BadRequest(f"path: one of {', '.join(MULTICAST_PATHS)}")
    return MulticastResult(session, digest.lower(), counts[0], counts[1], path)


# The kinds of work (common.policy.model.ActionKind's values, as the answer's "work" carries
# them) that name an image, and so may name one on another server.
IMAGE_WORK = ("restore", "make")


def work_answer(assignment: Any, mode: str, own_names: tuple[str, ...] = ()
                ) -> tuple[dict[str, Any], RemotePath | None]:
    """The JSON answer to a work query, and the other server when the answer is a referral.
    In manual mode an image on another server raises BadPath with the original's denial.

    `assignment` is the policy's decision (common.policy.model.WorkAssignment), read here by
    its fields only: the imaging wing does not import the policy wing (the engine imports this
    module, and the rule engine is the server's)."""
    action = assignment.action
    answer: dict[str, Any] = {
        "work": action.kind.value,
        "image": action.image,
        "addons": list(action.addons),
        "shrink": action.shrink,
        "fileset": action.fileset,
        "session": action.session,
        "reason": assignment.reason,
        "rule": assignment.rule,
    }
    if action.kind.value in IMAGE_WORK and action.image.startswith("//"):
        where = parse_image_path(action.image, own_names)
        if isinstance(where, LocalPath):
            answer["image"] = where.path
            return answer, None
        if mode != "auto":
            raise BadPath(MANUAL_REFERRAL_ERROR.format(server=where.server))
        answer.update({"work": "referral", "action": action.kind.value,
                       "server": where.server, "path": where.path})
        return answer, where
    return answer, None


def work_fileset(answer: dict[str, Any]) -> int:
    """The image's file set a work answer asks a restore to put down: 1 (everything) when
    absent, as from a server older than file sets; ValueError for anything but 1..MAX_SETS."""
    value = answer.get("fileset", 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SETS:
        raise ValueError(f"fileset: {str(value)[:20]!r} is not a file set number 1 to "
                         f"{MAX_SETS}")
    return value


def error_header_value(message: str) -> str:
    """The reason as a header value: printable ASCII on one line (headers are latin-1 and a
    newline would end the header), at most 512 characters."""
    text = "".join(c if " " <= c <= "~" else "?" for c in message)
    return text[:512]


# ---------------------------------------------------------------------- the client's half

def split_server(server: str) -> tuple[str, int]:
    """'host', 'host:port', '[v6]', '[v6]:port' -> (host, port)."""
    text = server.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError(f"'{server}' is not a server name")
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"'{server}': bad port '{port}'") from None
    if not 0 < number < 65536:
        raise ValueError(f"'{server}': bad port {number}")
    return host, number


def image_url(path: str) -> str:
    """/v1/images/<path>, each folder percent-encoded; //server/path keeps its two slashes."""
    if path.startswith("//"):
        return IMAGES_PREFIX + "/" + quote(path[2:], safe="/:[]")
    return IMAGES_PREFIX + quote(path.lstrip("/"), safe="/")


def referral_target(location: str | None) -> tuple[str, str] | None:
    """The (server, path) a 307's Location names (http://server/v1/images/<path>), or None
    when it names no image on another server."""
    if not location:
        return None
    parts = urlsplit(location)
    if not parts.netloc or not parts.path.startswith(IMAGES_PREFIX):
        return None
    return parts.netloc, unquote(parts.path[len(IMAGES_PREFIX):])


def error_reason(body: bytes) -> str:
    """The reason in a refusal's body ({"error": reason}), or the body's first characters."""
    try:
        answer = json.loads(body)
        if isinstance(answer, dict) and "error" in answer:
            return str(answer["error"])
    except ValueError:
        pass
    return body.decode("utf-8", "replace").strip()[:300] or "no reason given"
