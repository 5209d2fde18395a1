"""Errors a user can fix: each message names the problem and the fix on one line."""


class TransferlabError(Exception):
    """Base class; the CLI prints these as one line and exits 2, without a traceback."""


class ConfigError(TransferlabError, ValueError):
    """A config value is invalid; raised before any heavy work."""


class DataError(TransferlabError, ValueError):
    """Input data is missing, malformed or inconsistent."""
