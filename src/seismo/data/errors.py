"""The one error type of `seismo.data`."""


class DataError(ValueError):
    """Data that cannot be used. The message says what, where, and what to do."""
