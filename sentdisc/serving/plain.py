"""The same API without Ray: one uvicorn process, one ModelServer, the same batching.

What a user would run instead of Serve on one machine, and the baseline benchmarks/bench_serve.py
measures Serve against:

    python -m sentdisc.serving.plain checkpoint=DIR classifier=FILE [port=8000] [threads=1]
"""
from __future__ import annotations

import sys

from fastapi import FastAPI

from sentdisc.errors import InputError
from sentdisc.serving.api import make_api
from sentdisc.serving.args import AppArgs, BatchConfig, check_args
from sentdisc.serving.server import ModelServer


def plain_app(args: AppArgs | dict, batching: BatchConfig | dict | None = None,
              threads: int = 1) -> FastAPI:
    args = check_args(args if isinstance(args, AppArgs) else AppArgs.model_validate(args))
    server = ModelServer(args, threads=threads)
    server.configure(batching if isinstance(batching, BatchConfig)
                     else BatchConfig.model_validate(batching or {}))
    return make_api(server)


PROG = "python -m sentdisc.serving.plain"


def _int(pairs: dict, key: str, default: int) -> int:
    raw = pairs.pop(key, str(default))
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"{key}={raw}: not an integer") from None


def main(argv=None) -> int:
    import uvicorn

    argv = sys.argv[1:] if argv is None else argv
    try:
        bad = [a for a in argv if "=" not in a]
        if bad:
            raise InputError(f"{bad[0]!r} is not key=value (usage: {PROG} checkpoint=DIR "
                             f"[classifier=FILE] [port=8000] [threads=1] ...)")
        pairs = dict(a.split("=", 1) for a in argv)
        port, threads = _int(pairs, "port", 8000), _int(pairs, "threads", 1)
        if not 0 <= port <= 65535:
            raise InputError(f"port={port}: expected 0..65535")
        if threads < 1:
            raise InputError(f"threads={threads}: expected at least 1")
        host = pairs.pop("host", "127.0.0.1")
        # BatchConfig checks the range, with its own message
        batching = {k: _int(pairs, k, 0) for k in list(pairs) if k in BatchConfig.model_fields}
        app = plain_app(pairs, batching, threads)
    except InputError as e:  # AppArgsError too: raised outside click, it would be a traceback
        msg = getattr(e, "message", str(e)).removeprefix("sentdisc serve: ")
        if ". Known: " in msg:  # the app's keys; this server takes its own too
            known = msg.rsplit(". Known: ", 1)[1].split(", ")
            msg += "".join(f", {k}" for k in ("port", "host", "threads",
                                               *BatchConfig.model_fields) if k not in known)
        print(f"{PROG}: {' '.join(msg.split())}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
