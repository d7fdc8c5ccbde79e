"""preboot-proxydhcpd: the Preboot Proxy DHCP Service (python -m proxydhcpd)."""

from __future__ import annotations

import sys

from common.errors import EX_SOFTWARE
from common.daemon.runner import DaemonSpec, run
from common.daemon.services import PROXYDHCPD

from .config import SCHEMA, make_settings

try:
    from .server import ProxyDhcpServer
except (ImportError, OSError) as exc:  # a module of ours missing (a broken installation)
    print(f"preboot-proxydhcpd: cannot load the server: {exc}", file=sys.stderr)
    sys.exit(EX_SOFTWARE)

SPEC = DaemonSpec(
    service=PROXYDHCPD,
    schema=SCHEMA,
    make_settings=make_settings,
    make_service=ProxyDhcpServer,
)


def main(argv: list[str] | None = None) -> int:
    return run(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
