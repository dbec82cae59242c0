"""Serving a checkpoint over HTTP with Ray Serve; installed with the package, so from anywhere:

    serve run sentdisc.serving:build_app checkpoint=DIR classifier=FILE
    serve deploy serve/config.yaml        # import_path: sentdisc.serving:build_app

From Python: ``serve.run(make_app({"checkpoint": DIR}, batching={"max_batch_size": 16}))``.
"""
from sentdisc.serving.app import SentdiscServer, build_app, make_app
from sentdisc.serving.args import AppArgs, AppArgsError, BatchConfig

__all__ = ["AppArgs", "AppArgsError", "BatchConfig", "SentdiscServer", "build_app", "make_app"]
