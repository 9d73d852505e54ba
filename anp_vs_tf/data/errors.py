"""The one exception data loading raises."""


class DataError(Exception):
    """The data cannot be found or read. The message is one line: what is wrong and what to do."""
