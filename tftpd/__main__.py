"""preboot-tftpd: the Preboot TFTP Service (python -m tftpd)."""

from __future__ import annotations

import sys

from common.daemon.runner import DaemonSpec, run
from common.daemon.services import TFTPD

from .config import SCHEMA, make_settings
from .server import TftpServer

SPEC = DaemonSpec(
    service=TFTPD,
    schema=SCHEMA,
    make_settings=make_settings,
    make_service=TftpServer,
)


def main(argv: list[str] | None = None) -> int:
    return run(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
