"""The imaging wire formats that both the engine (img) and the server (imgsrvd) speak: the
image file format (imageformat.py: the pure codec; imagefile.py: reader and writer), the
imaging protocol, both halves (protocol.py: paths, requests, answers, headers, referrals), and
the multicast protocol's pure codec (multicast.py: packets, the group address, the image
digest; docs/multicast-protocol.md), its timers (mctimers.py: round trips, probe interval,
lost deadlines, JOIN back-off) and its byte-range bookkeeping (mcranges.py: an interval set,
the first pass's send order).

May import: the foundation only; never common.policy or the directory (the engine carries no
rule engine), never common.daemon, never a daemon.
"""
