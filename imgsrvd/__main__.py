"""preboot-imgsrvd: the Preboot Imaging Service (python -m imgsrvd)."""

from __future__ import annotations

import sys

from common.daemon.runner import DaemonSpec, run
from common.daemon.services import IMGSRVD

from .config import SCHEMA, make_settings
from .server import ImagingServer

SPEC = DaemonSpec(
    service=IMGSRVD,
    schema=SCHEMA,
    make_settings=make_settings,
    make_service=ImagingServer,
    event_loop="asyncio",        # image downloads go out with sendfile(2)
)


def main(argv: list[str] | None = None) -> int:
    return run(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
