"""The one exception type for mistakes a user can make (bad config, bad data, bad paths).

The CLI prints these without a traceback and exits non-zero; anything else is a bug.
"""


class ColossusError(Exception):
    """A user-facing error whose message says what was wrong and what to do about it."""
