"""What clients see when the ONLY model replica is SIGKILLed under load (Ray 2.60, the shipped
ingress: HAProxy + throughput-optimized mode), measured rather than assumed.

    python benchmarks/serve_replica_gap.py            # 4 clients, 25 s, kill at 2 s

Prints each outcome's count (status code or the client's exception), the longest request,
whether any ran into the client's timeout, and when the first answer after the kill came. A
tiny random-weight mLSTM: the gap is Serve's, not the model's load time.
"""
from __future__ import annotations

import collections
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks._common import wait_healthy  # noqa: E402

CLIENT_TIMEOUT_S = 30


def main() -> None:
    import ray
    import torch
    from ray import serve

    from sentdisc import ByteLM, ModelConfig, save
    from sentdisc.serving import SentdiscServer
    from sentdisc.serving.args import AppArgs, check_args
    from sentdisc.serving.ingress import SERVE_ENV

    os.environ.update(SERVE_ENV)
    torch.manual_seed(0)
    ckpt = save(ByteLM(ModelConfig(embed_size=8, rnn_size=32)), Path(tempfile.mkdtemp()) / "m")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = SentdiscServer.options(num_replicas=1).bind(
            check_args(AppArgs(checkpoint=str(ckpt))))
        serve.run(app, name="gap", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        pid = requests.get(url + "/healthz", timeout=30).json()["pid"]
        outcomes, stop = [], time.time() + 25

        def client():
            session = requests.Session()
            while time.time() < stop:
                t0 = time.time()
                try:
                    r = session.post(url + "/featurize", json={"texts": ["a fine day"]},
                                     timeout=CLIENT_TIMEOUT_S)
                    outcomes.append((r.status_code, t0, time.time()))
                except requests.RequestException as e:
                    outcomes.append((type(e).__name__, t0, time.time()))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        killed = time.time()
        os.kill(pid, signal.SIGKILL)
        for t in threads:
            t.join()
        after = [end for code, _, end in outcomes if code == 200 and end > killed]
        codes = collections.Counter(code for code, _, _ in outcomes)
        print(f"outcomes: {dict(codes)}")
        print(f"longest request: {max(end - start for _, start, end in outcomes):.1f} s "
              f"(client timeout {CLIENT_TIMEOUT_S} s); timeouts: {codes['ReadTimeout']}")
        print(f"first answer after the kill: {min(after) - killed:.1f} s" if after
              else "no answer after the kill")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
