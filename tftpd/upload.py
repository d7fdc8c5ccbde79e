"""Uploads land under a temporary name and appear under their final name only when complete.

The temporary file sits in the target folder (same file system, so the final step is atomic),
is fsynced before it is published, and is removed on any failure, so an interrupted upload never
leaves a partial file under the name the client asked for. Without AllowOverwrite the final step
is link(2), which fails if the name exists, instead of rename(2), which would replace it.
"""

from __future__ import annotations

import os
import secrets

from common.fileio import publish

from .netascii import Decoder

TEMP_PREFIX = ".tftp-upload-"


class AtomicUpload:
    def __init__(self, final_path: str, allow_overwrite: bool, netascii: bool):
        self.final_path = final_path
        self.allow_overwrite = allow_overwrite
        folder, name = os.path.split(final_path)
        self.temp_path = os.path.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(6)}-{name}")
        self._fd: int | None = os.open(self.temp_path,
                                       os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._decoder = Decoder() if netascii else None

    def write(self, data: bytes) -> None:
        assert self._fd is not None
        if self._decoder is not None:
            data = self._decoder.feed(data)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def commit(self) -> None:
        assert self._fd is not None
        try:
            if self._decoder is not None:
                self.write(self._decoder.finish())
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            # without AllowOverwrite: link, EEXIST instead of replacing
            publish(self.temp_path, self.final_path, replace=self.allow_overwrite)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass
