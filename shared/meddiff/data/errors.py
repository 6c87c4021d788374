"""The one error type for bad input data."""

from meddiff.errors import UserError


class DataError(UserError):
    """Bad input data; the message names the file and the fix."""
