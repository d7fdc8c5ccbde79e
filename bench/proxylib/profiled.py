"""Run `python -m proxydhcpd ARGS` under cProfile with a CPU-time clock; dump stats on exit.

    python3 profiled.py OUT.pstats --foreground --config X     (PYTHONPATH = the checkout)

The clock is time.process_time, so time the daemon spends blocked in epoll (idle) is not
counted and the figures are the daemon's own CPU time (with the profiler's overhead on every
Python call: read them as shares, not as absolute speed). bench/run-proxydhcp-bench --profile
uses it.
"""

import cProfile
import runpy
import sys
import time


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["proxydhcpd", *sys.argv[2:]]
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    try:
        runpy.run_module("proxydhcpd", run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        prof.disable()
        prof.dump_stats(out)


if __name__ == "__main__":
    main()
