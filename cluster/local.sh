#!/usr/bin/env bash
# A one-machine Ray cluster for sentdisc: start it, submit the jobs to it, look at it, stop it.
#
#   cluster/local.sh start            # head node with token auth + dashboard on 127.0.0.1:8265
#   cluster/local.sh submit pretrain --config jobs/configs/local.yaml
#   cluster/local.sh submit transfer --load_model experiments/local/checkpoint_final ...
#   cluster/local.sh serve CHECKPOINT CLASSIFIER   # serve deploy of serve/config.yaml
#   cluster/local.sh status
#   cluster/local.sh stop
#
# Ray >= 2.52 authenticates every API call with a token when RAY_AUTH_MODE=token (2.59+ turns it
# on by default for local clusters). The token lives in ~/.ray/auth_token unless RAY_AUTH_TOKEN
# is set; every `ray` command below reads it the same way, so start/submit/stop just work.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=token
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
GCS_PORT="${GCS_PORT:-6379}"
export RAY_ADDRESS="http://127.0.0.1:${DASHBOARD_PORT}"

cmd="${1:-}"; shift || true
case "$cmd" in
  start)
    [ -n "${RAY_AUTH_TOKEN:-}" ] || ray get-auth-token --generate >/dev/null
    # Workers run this environment's Python: `serve deploy` imports sentdisc.serving from the
    # installed package (the jobs get the repo through --working-dir instead). Checked from /,
    # where the checkout's own folder cannot stand in for an installed package.
    (cd / && python -c "import sentdisc.serving") 2>/dev/null \
      || { echo "local.sh: sentdisc is not installed here: pip install -e ." >&2; exit 1; }
    # Serve's HAProxy ingress + throughput-optimized mode: read when Serve's processes start.
    eval "$(python -m sentdisc.serving.ingress)"
    # Listen on loopback only: a laptop cluster has no business on the network.
    ray start --head --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
      --num-cpus="${NUM_CPUS:-$(nproc)}" "$@"
    echo "dashboard: $RAY_ADDRESS   (token: ray get-auth-token)"
    ;;
  submit)
    job="${1:?usage: local.sh submit pretrain|transfer|visualize [flags...]}"; shift
    # A job runs in a temporary copy of the working dir: give it absolute data and output
    # folders so results land in ./experiments here (a later --experiment_dir still wins).
    data="${SENTDISC_DATA:-$(cd .. && pwd)/shared/data}"
    ray job submit --working-dir . \
      --runtime-env-json "{\"env_vars\": {\"SENTDISC_DATA\": \"$data\"}}" \
      -- python "jobs/${job}.py" --experiment_dir "$PWD/experiments" "$@"
    ;;
  serve)
    ckpt="${1:?usage: local.sh serve CHECKPOINT CLASSIFIER}"; clf="${2:?classifier.json}"
    ckpt=$(realpath "$ckpt"); clf=$(realpath "$clf")   # replicas do not run in this folder
    tmp=$(mktemp --suffix=.yaml)
    python - "$ckpt" "$clf" "$tmp" <<'PY'
import sys, yaml
ckpt, clf, out = sys.argv[1:]
cfg = yaml.safe_load(open("serve/config.yaml"))
for app in cfg["applications"]:
    app.setdefault("args", {}).update(checkpoint=ckpt, classifier=clf)
yaml.safe_dump(cfg, open(out, "w"))
PY
    serve deploy "$tmp" --address "$RAY_ADDRESS"
    echo "serving on http://127.0.0.1:8000/  (serve status --address $RAY_ADDRESS)"
    ;;
  status)
    ray status --address "127.0.0.1:${GCS_PORT}"
    ray job list
    ;;
  stop)
    ray stop "$@"
    ;;
  *)
    sed -n '2,12p' "$0"; exit 2 ;;
esac
