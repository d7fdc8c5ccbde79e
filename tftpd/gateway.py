"""Files tftpd does not read from its Root but asks the Preboot Policy Service for: what a
Secure Boot client's GRUB reads over TFTP (docs/secure-boot.md).

The distribution's signed network GRUB speaks TFTP only (no http module; unsigned modules do
not load under Secure Boot), so the per-machine answer must come over TFTP. tftpd relays two
names to prebootpolicyd, which owns every decision (prebootpolicyd/grubscript.py):

    grub/grub.cfg                               -> GET {PolicyGateway}/grub.cfg
    preboot/policy.grub/mac=M/ip=I/product=P... -> GET {PolicyGateway}/policy.grub?mac=M&ip=I&...

(a leading '/' is ignored, as for every name). GRUB reads `grub/x86_64-efi/grub.cfg` first and,
when that is not found, `grub/grub.cfg`; an administrator's own file at grub/x86_64-efi/grub.cfg
therefore still wins. In the second name each segment is NAME=VALUE; a segment without '=' is
part of the previous value (an SMBIOS string may hold '/'). policyd checks every value, exactly
as for iPXE's query.

`gateway_request` is pure (a file name in, what to ask out); `PolicyGateway` fetches over HTTP
with a time limit, a size limit and a bound on fetches at once. tftpd then sends the answer as
any file (options, windowsize, the transfer's own limits). A policy service that does not
answer gives the client a TFTP error naming it; GRUB then exits to the firmware.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from urllib.parse import urlencode

log = logging.getLogger("preboot.tftpd")

BOOTSTRAP_NAME = "grub/grub.cfg"
POLICY_PREFIX = "preboot/policy.grub/"
MAX_FACTS = 32                   # segments read from one name (policyd knows about a dozen)
FETCH_TIMEOUT_S = 5.0
MAX_ANSWER_BYTES = 64 * 1024     # a GRUB answer is a few KiB
MAX_FETCHES = 64                 # at once; more requests are dropped and the clients retry


@dataclass(frozen=True)
class GatewayRequest:
    """What to ask the policy service for one TFTP file name."""

    path: str                                 # "/grub.cfg" or "/policy.grub"
    query: tuple[tuple[str, str], ...] = ()

    def url(self, base: str) -> str:
        return base.rstrip("/") + self.path + ("?" + urlencode(self.query) if self.query else "")


class GatewayError(Exception):
    """The policy service gave no usable answer; str() is the one-line reason for the client."""


def gateway_request(filename: str) -> GatewayRequest | None:
    """The request for a TFTP file name, or None when the name is a file of the Root."""
    name = filename.lstrip("/")
    if name == BOOTSTRAP_NAME:
        return GatewayRequest("/grub.cfg")
    if not name.startswith(POLICY_PREFIX):
        return None
    facts: list[list[str]] = []
    for segment in name[len(POLICY_PREFIX):].split("/"):
        key, sep, value = segment.partition("=")
        if sep and key and key.isidentifier():
            if len(facts) >= MAX_FACTS:
                break
            facts.append([key, value])
        elif facts:
            facts[-1][1] += "/" + segment
    return GatewayRequest("/policy.grub", tuple((k, v) for k, v in facts))


def base_url(template: str, local: str) -> str:
    """PolicyGateway with {server} replaced by the address the client asked tftpd on."""
    return template.replace("{server}", local)


class PolicyGateway:
    """Fetches gateway files over HTTP (aiohttp, one session for the daemon's life)."""

    def __init__(self, max_fetches: int = MAX_FETCHES):
        self.max_fetches = max_fetches
        self.in_flight = 0
        self._session = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def full(self) -> bool:
        return self.in_flight >= self.max_fetches

    async def fetch(self, url: str) -> bytes:
        """The answer's body; GatewayError with the reason when there is none."""
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S),
                headers={"User-Agent": "preboot-tftpd"})
        self.in_flight += 1
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                body = await response.content.read(MAX_ANSWER_BYTES + 1)
                if len(body) > MAX_ANSWER_BYTES:
                    raise GatewayError(f"the policy service's answer is over "
                                       f"{MAX_ANSWER_BYTES} bytes")
                if response.status != 200:
                    first = body.decode("utf-8", "replace").strip().splitlines()[:1]
                    raise GatewayError(f"the policy service answered {response.status}"
                                       + (f": {first[0][:200]}" if first else ""))
                return body
        except asyncio.TimeoutError:
            raise GatewayError(f"the policy service did not answer within "
                               f"{FETCH_TIMEOUT_S:.0f} s") from None
        except aiohttp.ClientError as exc:
            raise GatewayError(f"the policy service cannot be reached: "
                               f"{type(exc).__name__}") from None
        finally:
            self.in_flight -= 1
