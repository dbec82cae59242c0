"""HTTP serving of a sentdisc checkpoint: one Ray Serve deployment that is its own FastAPI app.

    serve run sentdisc.serving:build_app checkpoint=DIR classifier=FILE   # local, 127.0.0.1:8000
    serve deploy serve/config.yaml                                        # a cluster

Each SentdiscServer replica loads the checkpoint and classifier.json once and answers HTTP
itself, so a request makes one hop (proxy, or with Ray's HAProxy ingress the HAProxy, straight to
the replica). It checks every request against the caps before any model work and hands the
texts of featurize and sentiment requests to the model's running batch, in the model's own
process (serving.model_process: texts join at the next chunk and leave when they end;
X-Batch-Size says how many texts it held). Batch settings are the
deployment's user_config, applied in ``reconfigure`` without a restart.

All model work is the library's (sentdisc.featurize, sentdisc.viz, the transfer Classifier);
what the classifier says about reading the model is its Probe's. No endpoint takes a path.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI
from ray import serve

from sentdisc.serving.api import make_api
from sentdisc.serving.args import AppArgs, BatchConfig, check_args
from sentdisc.serving.server import ModelServer

logger = logging.getLogger("ray.serve")


# A full queue (every replica busy or gone) answers 503 + Retry-After at once instead of making
# clients wait out their timeouts. No access log line per request: at hundreds of small
# requests a second it costs the replica's event loop time it needs to read the next ones
# (errors are still logged). serve/config.yaml sets the same.
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=128,
                  health_check_period_s=10, max_queued_requests=256,
                  backpressure_config={"status_code": 503, "retry_after_s": 1},
                  logging_config={"enable_access_log": False})
@serve.ingress()
class SentdiscServer(ModelServer):
    """One model + classifier per replica, behind its own FastAPI app."""

    def __init__(self, args: AppArgs):
        import ray

        from sentdisc.serving.ingress import PROXY_WARNING, in_effect

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        super().__init__(args, threads=max(1, int(cpus)))  # torch uses the CPUs Serve gave
        if not in_effect() and _rank(serve.get_replica_context()) == 0:
            logger.warning(PROXY_WARNING)  # once per deployment: by its first replica

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Built per replica, after __init__, so routes, caps and schema see this replica's
        # arguments (a module-level app would be frozen when the class is decorated).
        return make_api(self)

    async def reconfigure(self, user_config: dict) -> None:
        """Serve calls this after __init__, and again on a live replica whenever a redeploy
        changes only the user_config: batching is retuned without a restart."""
        self.configure(BatchConfig.model_validate(user_config or {}))
        logger.info(f"sentdisc serve: batching {self.batch.model_dump()}")

    def check_health(self) -> None:
        # A checkpoint that cannot be loaded keeps the replica up (a restart would fail the
        # same way); a model process that died is replaced with the replica.
        if self.model is not None and self.model.died:
            raise RuntimeError(self.model.died)

    def __del__(self):
        self.close()

    def info(self) -> dict:
        from sentdisc.serving.ingress import in_effect

        # which replica answered (a retune must not restart it), and behind which ingress
        return {**super().info(), "replica": serve.get_replica_context().replica_tag,
                "ingress": "haproxy" if in_effect() else "python proxy"}


def _rank(context) -> int:
    """The replica's rank in its deployment (a ``ReplicaRank``'s global rank)."""
    rank = getattr(context, "rank", None)
    return int(getattr(rank, "rank", 0) or 0)


# --- application builders ------------------------------------------------------------------

def make_app(args: AppArgs | dict, batching: BatchConfig | dict | None = None
             ) -> serve.Application:
    """The application for ``args``, with ``batching`` (default BatchConfig()) as the
    deployment's user_config. A config file's ``deployments: - name: SentdiscServer
    user_config:`` takes precedence over it, and a redeploy with new values retunes the live
    replicas."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    if not isinstance(batching, BatchConfig):
        batching = BatchConfig.model_validate(batching or {})
    return SentdiscServer.options(user_config=batching.model_dump()).bind(check_args(args))


def build_app(args: AppArgs) -> serve.Application:
    """The application builder of ``serve run`` and config files. Serve validates the args into
    AppArgs (the type hint says so); Python callers may pass a dict. Batch settings are not
    arguments: they are the deployment's user_config."""
    return make_app(args)
