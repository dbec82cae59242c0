"""The one base class of input errors: what a command reports in one line and exits 2 for.

Every error a user can cause with a flag, a file or a request (a missing path, a malformed
record in strict mode, a bad checkpoint, a classifier of the wrong size) derives from
``InputError``; anything else is a failure of the system and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input, reported as one line naming the file, field or flag at fault."""
