"""Who may talk to the node: peer AE titles bound to certificates, users, roles, lockout."""
