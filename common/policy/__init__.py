"""Policy and the directory: the policy model and the work decision (model.py: rules, actions,
workstations, menu, assign_work), the rule-filter language (rules.py) and its compiled matcher
(rulematch.py), the policy file (policyfile.py), and the directory that stores it all
(directory/: the interface, SQLite and LDAP backends, the holder the daemons use, the
`Directory =` settings), and who may ask for the work it decides: work capabilities
(capability.py, a pure codec), their key file (keyring.py) and the trust settings and the
Gate policyd and imgsrvd decide each request with (trust.py; docs/security.md); and machine
identity from the policy (docs/identity.md): identity policies, names and pools
(identitypolicy.py, pure) and the identity a machine gets, handed out through the directory's
assignment log (identityassign.py).

May import: the foundation and common.daemon (the directory settings are config keys); never
common.imaging, never a daemon.
"""
