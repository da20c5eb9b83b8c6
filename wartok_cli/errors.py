"""The one exception type for mistakes a user can fix.

The CLI turns a ``WartokError`` into a short message and exit status 2, with no
traceback. Everything else is a bug and keeps its traceback.
"""


class WartokError(Exception):
    """A user-facing error: the message names the file, field or value and the fix."""
