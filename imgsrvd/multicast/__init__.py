"""imgsrvd's multicast sessions (docs/multicast-protocol.md): the fourth imaging service.

    model.py     the contract between the two halves below: settings, session specs, join
                 requests and their admission, the status zmgmcast shows (plain dataclasses)
    engine.py    the data plane: the control socket (997/udp), each session's sender (pacing,
                 NAK repair from the image file, round trips, lost and slow receivers), run on
                 its own thread so the HTTP loop never waits for it; its pure decisions:
                 decide.py (start triggers, JOIN refusals, slow receivers), pacing.py (the
                 token bucket, the rate's adaptation), repair.py (the repair queue); its
                 sockets: udpio.py (the control socket, group sockets, UDP_SEGMENT runs)
    catalog.py   the control plane: which sessions exist (the directory's, client-initiated,
                 manual), who may join which (capabilities), start and stop, results

The codec both sides speak is common/imaging/multicast.py; img's receiver is img/mcreceive.py.
"""
