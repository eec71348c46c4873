"""The project's error type for mistakes a user can fix (a recipe key, a missing file, a bad shard).

Entry points print a ``UserError`` as one line and exit 2; anything else (a bug, an error raised by
torch or DeepSpeed) keeps its traceback. It subclasses ``ValueError`` so callers that catch that still do.
"""


class UserError(ValueError):
    """Something the user can fix; the message names the file, key or shard and says what to do."""
