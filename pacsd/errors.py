"""The exception hierarchy and the exit codes; only cli.py turns these into an exit."""

from __future__ import annotations

EXIT_OK = 0
EXIT_PROBLEM = 1  # the command ran and found a problem (corruption, failed check)
EXIT_USAGE = 2  # usage, config or environment error


class PacsdError(Exception):
    """Base of every error pacsd raises on purpose; str() is the one-line message."""

    exit_code = EXIT_USAGE


class ConfigError(PacsdError):
    """The configuration file is missing, unparsable or holds a bad value."""


class EnvironmentProblem(PacsdError):
    """Something outside the config is wrong: a missing file, a bad key, a busy port."""


class UsageError(PacsdError):
    """The command line itself is wrong (an argument, a refused value)."""


class NotFound(PacsdError):
    """A named AE title, user or file does not exist."""


class AlreadyExists(PacsdError):
    """Refusing to overwrite or re-create something that exists."""


class PolicyViolation(PacsdError):
    """A value was refused by policy (e.g. a password rule); the message names the rule."""


class ProblemFound(PacsdError):
    """The command ran and found a problem (verify, check-config, audit verify)."""

    exit_code = EXIT_PROBLEM


class StoreError(PacsdError):
    """A store operation failed; carries the DIMSE status the failure maps to."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
