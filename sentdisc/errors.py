"""The error classes a command reports in one line: exit 2 for bad input, 1 for a diagnosed
failure, 130 (Ctrl-C) or 143 (SIGTERM) for a run the user stopped.

Every error a user can cause with a flag, a file or a request (a missing path, a malformed
record in strict mode, a bad checkpoint, a classifier of the wrong size) derives from
``InputError``. ``RunFailed`` is a failure the system has diagnosed itself (a stalled run, with
what it waited for). ``Interrupted`` is a run the user stopped, with what it kept. Anything
else is a failure of the system and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input, reported as one line naming the file, field or flag at fault."""


class RunFailed(RuntimeError):
    """A run that failed for a reason already diagnosed in the message (exit 1, one line)."""


class Interrupted(KeyboardInterrupt):
    """A run the user stopped: Ctrl-C (exit 130) or SIGTERM, as `ray job stop` sends (143).
    The message says what was kept and how to go on, in one line. A KeyboardInterrupt, so
    tracking records the run as KILLED."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
