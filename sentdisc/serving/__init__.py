"""Serving a checkpoint over HTTP with Ray Serve; installed with the package, so from anywhere:

    serve run sentdisc.serving:build_app checkpoint=DIR classifier=FILE
    serve deploy serve/config.yaml        # import_path: sentdisc.serving:build_app

From Python: ``serve.run(make_app({"checkpoint": DIR}, batching={"max_batch_size": 16}))``.
"""
from sentdisc.serving.args import AppArgs, AppArgsError, BatchConfig

__all__ = ["AppArgs", "AppArgsError", "BatchConfig", "SentdiscServer", "build_app", "make_app"]


def __getattr__(name: str):
    # Ray Serve is imported on first use, not with the package: the model's process
    # (serving.model_process) and the plain server import this package and need none of it.
    if name in ("SentdiscServer", "build_app", "make_app"):
        from sentdisc.serving import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
