"""Running the filesystem tools img calls (e2fsck, resize2fs, ntfsresize, xfs_growfs, ...): a
time limit, no stdin, and a failure turned into one line naming the tool and its most telling
output line, raised as the caller's error class."""

from __future__ import annotations

import os
import subprocess


def run_tool(args: list[str], timeout_s: float, error: type[Exception],
             ok: tuple[int, ...] = (0,), noise: tuple[str, ...] = (),
             telling: tuple[str, ...] = ("error",)) -> subprocess.CompletedProcess:
    """Run args[0]; `error` with one line when it cannot start, times out or exits outside
    `ok`. The line quoted is the last output line holding one of `telling` (lower case), else
    the last line; lines holding one of `noise` are never quoted."""
    name = os.path.basename(args[0])
    try:
        done = subprocess.run(args, capture_output=True, text=True, errors="replace",
                              stdin=subprocess.DEVNULL, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise error(f"{name} timed out after {timeout_s:g} s") from None
    except OSError as exc:
        raise error(f"{name} could not start: {exc}") from None
    if done.returncode not in ok:
        lines = [line.strip() for line in (done.stderr + "\n" + done.stdout).splitlines()
                 if line.strip() and not any(word in line for word in noise)]
        found = [line for line in lines if any(word in line.lower() for word in telling)]
        detail = (found or lines or [f"exit status {done.returncode}"])[-1]
        raise error(f"{name} failed (exit status {done.returncode}): {detail}")
    return done
