"""Policy and the directory: the policy model and the work decision (model.py: rules, actions,
workstations, menu, assign_work), the rule-filter language (rules.py) and its compiled matcher
(rulematch.py), the policy file (policyfile.py), and the directory that stores it all
(directory/: the interface, SQLite and LDAP backends, the holder the daemons use, the
`Directory =` settings).

May import: the foundation and common.daemon (the directory settings are config keys); never
common.imaging, never a daemon.
"""
