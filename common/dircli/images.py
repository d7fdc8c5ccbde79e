"""preboot-dir images [--root DIR | --server HOST[:PORT]] [--json]: what an image root holds.

One line per file, sorted by path: the path under the root, the size (human and bytes), the
type (base or add-on, from the image header's metadata) and the date (the file's mtime, in the
server's local time). Only the header at the start and the trailer at the end of each file are
read, never the chunks (common/imaging/imagelist.py), so listing a root of large images costs
two small reads per file. A file that is not a complete image is listed with the reason ("not
an image: bad magic", "incomplete image: no trailer"); imgsrvd's partial uploads
(`.NAME.part-<hex>`) are left out.

--root reads the folder directly (on the imaging server host, or wherever the image root is
mounted). --server asks a running imgsrvd (`GET /v1/images`, docs/imaging-protocol.md) with an
operator's capability allowing `retrieve` (--token, --token-file or $PREBOOT_TOKEN; the server
lists only the images the capability's patterns name) over HTTP, or over TLS with
--server-pin SHA256 ($PREBOOT_SERVER_PIN) or --server-ca FILE, as img does.
"""

from __future__ import annotations

import argparse
import hmac
import http.client
import json
import os
import ssl
import sys
from dataclasses import asdict, fields

from common.imaging.imagelist import ImageEntry, list_images
from common.imaging.protocol import error_reason, split_server
from common.tlspin import PinError, fingerprint, parse_pin

DEFAULT_ROOT = "/var/lib/preboot/images"       # imgsrvd's ImageRoot default
LISTING_PATH = "/v1/images"
MAX_LISTING_BYTES = 64 << 20                   # a root of ~200 000 files; more is not a listing


def _token(args: argparse.Namespace, usage_error) -> str | None:
    if args.token:
        return args.token.strip()
    if args.token_file:
        try:
            with open(args.token_file, encoding="ascii", errors="replace") as handle:
                return handle.readline(8192).strip() or None
        except OSError as exc:
            raise usage_error(f"--token-file {args.token_file}: {exc.strerror}") from None
    return os.environ.get("PREBOOT_TOKEN", "").strip() or None


def _tls(args: argparse.Namespace, usage_error) -> tuple[ssl.SSLContext | None, str]:
    """The TLS context and the pin (or "") the connection must meet; (None, "") for HTTP."""
    pin_text = args.server_pin or os.environ.get("PREBOOT_SERVER_PIN", "")
    if pin_text.strip() and args.server_ca:
        raise usage_error("give --server-pin or --server-ca, not both")
    if args.server_ca:
        context = ssl.create_default_context(cafile=args.server_ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context, ""
    if not pin_text.strip():
        return None, ""
    try:
        pin = parse_pin(pin_text)
    except PinError as exc:
        raise usage_error(f"--server-pin: {exc}") from None
    # The pin is the whole check (common/tlspin.py): no CA, no name, no clock.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context, pin


def fetch_listing(server: str, token: str | None, context: ssl.SSLContext | None, pin: str,
                  timeout_s: float, usage_error) -> list[ImageEntry]:
    """GET /v1/images from imgsrvd at server (HOST[:PORT], 998 by default); usage_error with
    one line naming the server for anything but a listing."""
    try:
        host, port = split_server(server)
    except ValueError as exc:
        raise usage_error(f"--server {server}: {exc}") from None
    where = f"{host}:{port}"
    conn = (http.client.HTTPConnection(host, port, timeout=timeout_s) if context is None
            else http.client.HTTPSConnection(host, port, timeout=timeout_s, context=context))
    try:
        conn.connect()
        if pin:
            got = fingerprint(conn.sock.getpeercert(binary_form=True) or b"")
            if not hmac.compare_digest(got, pin):
                raise usage_error(f"{where}: the server's certificate (sha256:{got}) is not "
                                  f"the pinned one (sha256:{pin}); nothing was sent")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("GET", LISTING_PATH, headers=headers)
        answer = conn.getresponse()
        body = answer.read(MAX_LISTING_BYTES + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise usage_error(f"{where}: cannot list images: {exc}") from None
    finally:
        conn.close()
    if answer.status != 200:
        raise usage_error(f"{where}: {answer.status} {error_reason(body)}")
    return _entries(where, body, usage_error)


def _entries(where: str, body: bytes, usage_error) -> list[ImageEntry]:
    if len(body) > MAX_LISTING_BYTES:
        raise usage_error(f"{where}: the listing is larger than {MAX_LISTING_BYTES} bytes")
    names = {field.name for field in fields(ImageEntry)}
    try:
        items = json.loads(body)["images"]
        return [ImageEntry(**{key: item[key] for key in names if key in item})
                for item in items]
    except (ValueError, KeyError, TypeError) as exc:
        raise usage_error(f"{where}: not an image listing ({exc})") from None


def print_entries(entries: list[ImageEntry], where: str) -> None:
    if not entries:
        print(f"no images under {where}")
        return
    width = max(len(entry.path) for entry in entries)
    sizes = [f"{entry.size_human} ({entry.size} bytes)" for entry in entries]
    size_width = max(len(text) for text in sizes)
    for entry, size in zip(entries, sizes):
        date = entry.date[:10] + " " + entry.date[11:16]
        problem = f"  ({entry.problem})" if entry.problem else ""
        print(f"{entry.path:<{width}}  {size:>{size_width}}  {entry.type:<6}  {date}{problem}")


def run(args: argparse.Namespace, usage_error) -> int:
    if args.server:
        context, pin = _tls(args, usage_error)
        entries = fetch_listing(args.server, _token(args, usage_error), context, pin,
                                args.timeout_s, usage_error)
        where = args.server
    else:
        where = args.root or DEFAULT_ROOT
        if not os.path.isdir(where):
            raise usage_error(f"{where}: no such folder (--root names the imaging server's "
                              "ImageRoot)")
        entries = list_images(where)
    if args.json:
        json.dump([asdict(entry) for entry in entries], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print_entries(entries, where)
    return 0


def add_command(commands, usage_error) -> None:
    sub = commands.add_parser(
        "images", help="list the images an imaging server holds",
        description="List the files under the image root: path, size, type (base or "
                    "add-on, from the image header), date. --root reads the folder directly "
                    "(on the imaging server host); --server asks a running imgsrvd with an "
                    "operator's capability.")
    where = sub.add_mutually_exclusive_group()
    where.add_argument("--root", help=f"the image root, imgsrvd's ImageRoot (default "
                                      f"{DEFAULT_ROOT})")
    where.add_argument("--server", metavar="HOST[:PORT]",
                       help="ask this imaging server (port 998 unless given)")
    sub.add_argument("--token", help="with --server: an operator's capability allowing "
                                     "retrieve (default: --token-file, else $PREBOOT_TOKEN)")
    sub.add_argument("--token-file", metavar="FILE",
                     help="with --server: a file whose first line is the capability")
    sub.add_argument("--server-pin", metavar="SHA256",
                     help="with --server: talk TLS and accept only the certificate with this "
                          "SHA-256 fingerprint (default: $PREBOOT_SERVER_PIN)")
    sub.add_argument("--server-ca", metavar="FILE",
                     help="with --server: talk TLS and accept a certificate a CA in FILE "
                          "signed for the server's name")
    sub.add_argument("--timeout-s", type=float, default=30.0,
                     help="with --server: seconds to wait for the server (default 30)")
    sub.add_argument("--json", action="store_true", help="a JSON list, one object per file")
    sub.set_defaults(run=lambda args: run(args, usage_error))
