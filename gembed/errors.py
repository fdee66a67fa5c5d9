"""The one exception type for mistakes a user can fix (bad config, data, paths).

The CLI turns it into a single `gembed: error: ...` line and exit status 2; everything
else is a bug and keeps its traceback (exit status 1).
"""


class GembedUserError(Exception):
    """A user-fixable error. The message names the file (and line) and what to do."""
