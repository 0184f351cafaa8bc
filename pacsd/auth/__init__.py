"""Who may talk to the node: peer AE titles bound to certificates, users, roles, lockout."""

from __future__ import annotations

import os
import pwd


def operator() -> str:
    """The Unix user running an admin command (the invoking user too, when run through sudo)."""
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = str(os.getuid())
    sudo = os.environ.get("SUDO_USER")
    return f"{sudo} (as {name})" if sudo and os.geteuid() == 0 else name
