"""The same API without Ray: one uvicorn process, one ModelServer, the same batching.

What a user would run instead of Serve on one machine, and the baseline benchmarks/bench_serve.py
measures Serve against:

    python -m sentdisc.serving.plain checkpoint=DIR classifier=FILE [port=8000] [threads=1]
"""
from __future__ import annotations

import sys

from fastapi import FastAPI

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


def main(argv=None) -> int:
    import uvicorn

    pairs = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv))
    port, threads = int(pairs.pop("port", 8000)), int(pairs.pop("threads", 1))
    host = pairs.pop("host", "127.0.0.1")
    batching = {k: pairs.pop(k) for k in list(pairs) if k in BatchConfig.model_fields}
    batching = {k: int(v) for k, v in batching.items()}
    app = plain_app(pairs, batching, threads)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
