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
        print(_help())
        return 0
    # A first argument that is neither KEY=VALUE nor an option names a config file: serve run
    # would take a missing one for an import path (a ModuleNotFoundError traceback).
    config = args[0] if args and "=" not in args[0] and not args[0].startswith("-") else None
    if config is not None and not os.path.isfile(config):
        print(f"sentdisc serve: no such config file: {config} (KEY=VALUE arguments, or a "
              "config file: sentdisc serve --help)", file=sys.stderr)
        return 2
    chosen = apply_serve_env()
    if chosen:
        print("sentdisc serve: " + " ".join(f"{k}={v!r}" for k, v in chosen.items()),
              flush=True)
    _say_what_ctrl_c_waits_for()
    from ray.serve.scripts import cli

    target = [] if config is not None else ["sentdisc.serving:build_app"]
    return cli.main(args=["run", *target, *args], prog_name="sentdisc serve",
                    standalone_mode=True) or 0


def _help() -> str:
    """The usage, the application's KEY=VALUE arguments (AppArgs) with their help, and where
    serve run's own options are."""
    import textwrap

    from sentdisc.serving.args import AppArgs, BatchConfig

    lines = [" ".join(main.__doc__.split()), "", "KEY=VALUE arguments (the application's):"]
    for name, field in AppArgs.model_fields.items():
        default = "required" if field.is_required() else f"default {field.default}"
        lines.append(f"  {name}=  ({default}) " + " ".join((field.description or "").split()))
    lines = [textwrap.fill(line, 100, subsequent_indent="      ") if line.startswith("  ")
             else line for line in lines]
    lines += ["", "Batch settings (" + ", ".join(BatchConfig.model_fields) + ") are the "
              "deployment's user_config: set them in a config file (serve/config.yaml).",
              "serve run's own options (--address, --blocking, ...): serve run --help"]
    return "\n".join(lines)


DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


def _say_what_ctrl_c_waits_for() -> None:
    """On Ctrl-C, ``serve run`` shuts Serve down, and behind HAProxy each replica first drains
    for Serve's minimum period (30 s unless set) so a load balancer stops routing to it: say
    so, rather than leave a silent half minute."""
    import signal

    if not in_effect():
        return

    def on_ctrl_c(signum, frame):
        print(f"sentdisc serve: stopping: Serve drains each replica for "
              f"{os.environ.get(DRAIN_ENV, '30')} s first ({DRAIN_ENV})", flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, on_ctrl_c)


if __name__ == "__main__":
    print(shell_exports())
