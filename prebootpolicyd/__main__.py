"""preboot-policyd: the Preboot Policy Service (python -m prebootpolicyd)."""

from __future__ import annotations

import sys

from common.daemon.runner import DaemonSpec, run
from common.daemon.services import POLICYD

from .config import SCHEMA, make_settings
from .server import PolicyServer

SPEC = DaemonSpec(
    service=POLICYD,
    schema=SCHEMA,
    make_settings=make_settings,
    make_service=PolicyServer,
)


def main(argv: list[str] | None = None) -> int:
    return run(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
