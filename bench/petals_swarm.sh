#!/usr/bin/env bash
# Private Petals 2.2 swarm on loopback: 1 DHT bootstrap peer + one server per span in $SPANS (default 3 servers:
# 0:10 10:20 20:30). Same command lines as /work/shared/peers/petals/run_swarm.sh, generalised to N spans.
# Ports: DHT on $DHT_PORT (31337), server i on DHT_PORT+i (31338, 31339, 31340), all listening on 127.0.0.1.
# ANNOUNCE_HOST=127.0.0.2: server i announces /ip4/127.0.0.2/tcp/DHT_PORT+i (a proxy there -> 127.0.0.1 carries traffic).
# Usage: petals3.sh start|stop|status|check      (check = one short greedy generation through the swarm)
# Logs, pids, identities, initial_peer in $RUN_DIR.
set -euo pipefail
SCRATCH=${SCRATCH:-$HOME/.cache/beed-peers}
VENV=${VENV:-$SCRATCH/petals-venv}
MODEL=${MODEL:-$SCRATCH/models/smollm2-135m-hf-petals}
PREFIX=${PREFIX:-smollm2-135m-hf}
RUN_DIR=${RUN_DIR:-$SCRATCH/petals3-swarm}
DHT_PORT=${DHT_PORT:-31337}
SPANS=${SPANS:-"0:10 10:20 20:30"}
ANNOUNCE_HOST=${ANNOUNCE_HOST:-}
START_TIMEOUT=${START_TIMEOUT:-240}   # seconds to wait for each server's "Started"
PY="$VENV/bin/python"
mkdir -p "$RUN_DIR"

start() {
  if ls "$RUN_DIR"/*.pid >/dev/null 2>&1; then echo "pid files exist in $RUN_DIR: run '$0 stop' first"; exit 1; fi
  set -m   # job control: background jobs keep default SIGINT handling, so "stop" can shut them down gracefully
  local t0=$SECONDS
  "$PY" -m petals.cli.run_dht --host_maddrs /ip4/127.0.0.1/tcp/$DHT_PORT \
      --identity_path "$RUN_DIR/dht.id" >"$RUN_DIR/dht.log" 2>&1 &
  echo $! >"$RUN_DIR/dht.pid"
  for _ in $(seq 60); do grep -q "/p2p/" "$RUN_DIR/dht.log" && break; sleep 1; done
  PEER=$(grep -o "/ip4/127.0.0.1/tcp/$DHT_PORT/p2p/[A-Za-z0-9]*" "$RUN_DIR/dht.log" | head -1 || true)
  [ -n "$PEER" ] || { echo "DHT did not start"; cat "$RUN_DIR/dht.log"; stop; exit 1; }
  echo "$PEER" >"$RUN_DIR/initial_peer"
  local i=0
  for blocks in $SPANS; do
    i=$((i+1))
    ANN=(); [ -n "$ANNOUNCE_HOST" ] && ANN=(--announce_maddrs /ip4/$ANNOUNCE_HOST/tcp/$((DHT_PORT+i)))
    "$PY" -m petals.cli.run_server "$MODEL" --initial_peers "$PEER" --dht_prefix "$PREFIX" "${ANN[@]}" \
        --block_indices "$blocks" --device cpu --torch_dtype float32 --throughput 1.0 \
        --host_maddrs /ip4/127.0.0.1/tcp/$((DHT_PORT+i)) --identity_path "$RUN_DIR/server$i.id" \
        >"$RUN_DIR/server$i.log" 2>&1 &
    echo $! >"$RUN_DIR/server$i.pid"
  done
  echo "$i" >"$RUN_DIR/nservers"
  for n in $(seq "$i"); do
    for _ in $(seq "$START_TIMEOUT"); do
      grep -q "Started" "$RUN_DIR/server$n.log" && break
      kill -0 "$(cat "$RUN_DIR/server$n.pid")" 2>/dev/null || break
      sleep 1
    done
    grep -q "Started" "$RUN_DIR/server$n.log" || { echo "server$n did not start"; tail -30 "$RUN_DIR/server$n.log"; stop; exit 1; }
  done
  echo "started DHT + $i servers ($SPANS) in $((SECONDS-t0)) s"
  echo "INITIAL_PEER=$PEER"
}

descendants() { local c; for c in $(pgrep -P "$1" || true); do echo "$c"; descendants "$c"; done; }

stop() {  # SIGINT each top process (graceful), then SIGTERM/SIGKILL any survivor of its tree (p2pd, workers), by PID
  local names=() f
  for f in $(ls "$RUN_DIR"/server*.pid 2>/dev/null | sort -rV); do names+=("$(basename "$f" .pid)"); done
  names+=(dht)
  for name in "${names[@]}"; do
    f="$RUN_DIR/$name.pid"; [ -f "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      tree=$(descendants "$pid")
      kill -INT "$pid" 2>/dev/null || true
      for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      for p in $pid $tree; do kill -0 "$p" 2>/dev/null && kill -TERM "$p" 2>/dev/null || true; done
      sleep 1
      for p in $pid $tree; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true; done
    fi
    rm -f "$f"
  done
}

status() {
  local f
  for f in "$RUN_DIR"/dht.pid $(ls "$RUN_DIR"/server*.pid 2>/dev/null | sort -V); do
    [ -f "$f" ] && echo "$(basename "$f" .pid) pid $(cat "$f") $(kill -0 "$(cat "$f")" 2>/dev/null && echo alive || echo dead)"
  done; true
}

check() {  # one short greedy generation through the swarm (direct to 127.0.0.1; needs a proxy if ANNOUNCE_HOST was set)
  "$PY" - "$(cat "$RUN_DIR/initial_peer")" "$MODEL" "$PREFIX" <<'PYEOF'
import os, sys, time, torch
from transformers import AutoTokenizer
from petals import AutoDistributedModelForCausalLM
peer, model_dir, prefix = sys.argv[1:4]
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=[peer], dht_prefix=prefix,
                                                        torch_dtype=torch.float32)
ids = tok("The capital of France is", return_tensors="pt").input_ids
t0 = time.perf_counter()
with torch.inference_mode():
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
print(f"CHECK OK {time.perf_counter() - t0:.2f}s:", repr(tok.decode(out[0, ids.shape[1]:])), flush=True)
sm = model.transformer.h.sequence_manager   # petals 2.2 client can hang at exit: shut its DHT down, exit hard
sm.shutdown(); sm.dht.shutdown()
sys.stdout.flush(); os._exit(0)
PYEOF
}

case "${1:-start}" in start) start;; stop) stop;; status) status;; check) check;; *) echo "usage: $0 start|stop|status|check"; exit 2;; esac
