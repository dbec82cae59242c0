"""The jobs: what ``sentdisc <command>`` and ``python jobs/<job>.py`` run.

Each recipe module has ``main(argv=None) -> int``: it parses its config dataclasses, composes
library pieces, prints what it made, and returns the exit status through ``run``: 0 when done,
2 with one line on bad input (``sentdisc.errors.InputError``, including a data error raised
inside a Ray task), 1 with one line on a diagnosed failure (``RunFailed``) and with the
traceback on any other, 130 (Ctrl-C) or 143 (SIGTERM) with one line on a run the user
stopped (``Interrupted``).
``jobs/*.py`` are one-line shims over these, so a Ray job and the command run identical code.
"""
from __future__ import annotations

import sys
from collections.abc import Callable


def run(prog: str, body: Callable[[], object]) -> int:
    """Run a recipe's body under the exit-status convention."""
    from sentdisc.data.readers import as_data_error
    from sentdisc.errors import InputError, Interrupted, RunFailed

    try:
        body()
    except InputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"{prog}: failed: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"{prog}: interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except Exception as e:  # a failed Ray run whose cause is bad data: still one line
        data_error = as_data_error(e)
        if data_error is None:
            raise
        print(f"{prog}: error: {data_error}", file=sys.stderr)
        return 2
    return 0
