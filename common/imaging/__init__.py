"""The imaging wire formats that both the engine (img) and the server (imgsrvd) speak: the
image file format (imageformat.py: the pure codec; imagefile.py: reader and writer) and the
imaging protocol, both halves (protocol.py: paths, requests, answers, headers, referrals).

May import: the foundation only; never common.policy or the directory (the engine carries no
rule engine), never common.daemon, never a daemon.
"""
