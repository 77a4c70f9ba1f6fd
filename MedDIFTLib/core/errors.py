"""Errors that reach the user. Each carries a ``kind`` shared with the worker protocol."""


class MedDIFTError(Exception):
    """Base class: a problem the user can act on, with a one-line message."""

    kind = "internal"


class BadInputError(MedDIFTError):
    """An input file, volume, point set or option is unusable."""

    kind = "bad_input"


class BadRequestError(BadInputError):
    """A worker request that is malformed, too large or of an unknown type."""

    kind = "bad_request"


class MissingWeightsError(MedDIFTError):
    """Pretrained weights needed by a backbone are not on this machine."""

    kind = "missing_weights"


class OutOfMemoryError(MedDIFTError):
    """The device ran out of memory; the message says what to change."""

    kind = "out_of_memory"


class CancelledError(MedDIFTError):
    """The user cancelled the running job."""

    kind = "cancelled"


USER_ERRORS: tuple[type[MedDIFTError], ...] = (
    BadRequestError,
    BadInputError,
    MissingWeightsError,
    OutOfMemoryError,
    CancelledError,
)
"""The errors a job can end with, besides an internal failure; their ``kind`` is the wire's error kind."""

ERROR_KINDS: tuple[str, ...] = (*(error.kind for error in USER_ERRORS), MedDIFTError.kind)
