"""The shared library of the Preboot Services daemons and the imaging engine: a foundation and
three wings, plus the `preboot-dir` program.

    common/*.py        the foundation: errors.py (exit codes, PrebootError, ConfigError, ...),
                       fileio.py (fsync a folder, atomic file), machine.py (the machine facts
                       rules match and the protocols carry), tlspin.py (certificate pins), units.py
                       (sizes for people), identity.py (a machine's identity: name, DNS
                       suffix, workgroup, IP settings).
                       Standard library only.
    common/daemon/     daemon plumbing: config syntax, the one lifecycle path (runner), logging,
                       pidfile, sd_notify, status socket, TCP listener, worker pool, the registry
                       of services, counters, the aiohttp daemon plumbing.
    common/policy/     policy and the directory: the policy model and work decision (model.py),
                       rule filters (rules.py, rulematch.py), the policy file, the directory
                       backends (directory/: SQLite, LDAP).
    common/imaging/    the imaging wire formats that img and imgsrvd both speak: the image format
                       (imageformat.py, imagefile.py), both halves of the imaging protocol
                       (protocol.py) and the multicast protocol's pure codec (multicast.py).
    common/dircli/     the `preboot-dir` program (python -m common.dircli), not a library.

Who may import whom. tests/unit/test_import_rules.py reads this table and checks every import
of the product against it (ast, nothing imported): change the table, the code and the test's
list of parts together. Each part may also import itself; "-" is nothing of the project.

    part                 may import
    foundation           -  (nothing else of the project)
    common.daemon        foundation
    common.policy        foundation, common.daemon  (the directory settings are config keys)
    common.imaging       foundation  (never the policy or the directory: img carries no rules)
    common.dircli        foundation, common.daemon, common.policy, common.imaging
    tftpd, proxydhcpd    foundation, common.daemon
    prebootpolicyd       foundation, common.daemon, common.policy
    imgsrvd              foundation, common.daemon, common.policy, common.imaging
    img                  foundation, common.imaging
    zmgmcast             foundation, common.daemon

"foundation" is common itself and its top-level modules (common.errors, common.fileio,
common.machine, common.tlspin). So nothing under common/ imports a daemon, img or zmgmcast, and the daemons
never import each other: they share only common/. Exceptions (none today) are listed here
with their reason and in the test's EXCEPTIONS.
"""

__version__ = "0.1.0"
