"""Errors a person can act on: each carries one sentence naming what is wrong and how to fix it."""


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line and a non-zero exit."""


class ConfigError(UserError):
    """A configuration value is out of range or inconsistent."""


class DataError(UserError):
    """A data file is missing, corrupt, or cannot be fetched."""


class TrackingError(UserError):
    """The MLflow tracking store cannot be reached or used."""


class NonFiniteLossError(UserError):
    """Training diverged: the loss became NaN or infinite."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line for a message: its first line, or its type when it has no text."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
