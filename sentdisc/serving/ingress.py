"""How Ray Serve should carry sentdisc's traffic: the environment of the Ray processes.

Serve reads these when its controller, proxies and replicas start, that is from the environment
of ``ray start`` (or of the process whose ``ray.init`` / ``serve run`` starts a local Ray), so
they cannot live in serve/config.yaml. Measured on a 2-core machine (README, Speed): an echo app
at 32 clients goes from 90-155 to 318-719 requests/s with them, and a replica killed under load
loses no request when another is up.

* HAProxy ingress + direct ingress: the HAProxy forwards a request straight to a replica's own
  HTTP server: one hop, no Python proxy in the path.
* Throughput-optimized mode: gRPC between Serve's parts, user code on the replica's main loop,
  request logs buffered, GC frozen after startup.
* Retry on a connection refused, an empty or a cut-off response: a request whose replica died
  before it answered goes to another replica (every endpoint is idempotent; a seeded /generate
  repeats). Not on a 5xx status: a 503 means "the queue is full", retried by the client.

HAProxy binds replicas' HTTP ports on all interfaces (so HAProxy on other nodes can reach them):
on a laptop keep the firewall closed, or set RAY_SERVE_ENABLE_HA_PROXY=0.
"""
from __future__ import annotations

import os

SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response",
}


def apply_serve_env(environ=os.environ) -> dict:
    """Set SERVE_ENV in ``environ`` where the user has not chosen otherwise; what it set."""
    chosen = {k: v for k, v in SERVE_ENV.items() if k not in environ}
    environ.update(chosen)
    return chosen


def shell_exports() -> str:
    """``export K=V ...`` lines for scripts (cluster/local.sh) that start Ray themselves."""
    return "\n".join(f"export {k}=\"${{{k}:-{v}}}\"" for k, v in SERVE_ENV.items())


def in_effect(environ=os.environ) -> bool:
    """Whether this process (a replica: it has the environment its Ray node was started
    with) runs behind Serve's HAProxy ingress, as Serve itself reads it."""
    return environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0") == "1"


PROXY_WARNING = (
    "sentdisc serve: Ray Serve runs through its Python proxy here, not its HAProxy ingress: "
    "single-text requests are answered several times slower (README, Speed). The ingress is "
    "read from the environment Ray was started with: run `sentdisc serve ...` (it sets it), or "
    "`eval \"$(python -m sentdisc.serving.ingress)\"` before `ray start` / `serve run`")


def main(argv=None) -> int:
    """``sentdisc serve [KEY=VALUE ... | CONFIG.yaml] [serve run options]``: ``serve run`` of
    sentdisc's application with the ingress environment set, so a Ray it starts serves
    through HAProxy. (A Ray already running keeps the environment it was started with.)"""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0
    chosen = apply_serve_env()
    if chosen:
        print("sentdisc serve: " + " ".join(f"{k}={v!r}" for k, v in chosen.items()),
              flush=True)
    from ray.serve.scripts import cli

    target = [] if args and args[0].endswith((".yaml", ".yml")) else ["sentdisc.serving:build_app"]
    return cli.main(args=["run", *target, *args], prog_name="sentdisc serve",
                    standalone_mode=True) or 0


if __name__ == "__main__":
    print(shell_exports())
