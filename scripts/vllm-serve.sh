#!/usr/bin/env bash
# Run vLLM's OpenAI server (the CPU build in .venv-vllm) on a OneLLM model folder.
#
#   scripts/vllm-serve.sh run   MODEL [PORT] [-- VLLM_ARGS...]   foreground (exec)
#   scripts/vllm-serve.sh start MODEL [PORT] [-- VLLM_ARGS...]   background, returns once /health answers
#   scripts/vllm-serve.sh stop  [PORT]
#   scripts/vllm-serve.sh status [PORT]
#
# MODEL is a model folder (model_repo/<name>, whose llm/ is served) or an LLM folder itself.
# PORT defaults to 8000. Settings by environment: VLLM_HOST (127.0.0.1), VLLM_DTYPE (float32),
# VLLM_MAX_MODEL_LEN (2048), VLLM_CPU_KVCACHE_SPACE (GiB, 1), VLLM_START_TIMEOUT (s, 300),
# VLLM_STATE_DIR (where `start` keeps its pid and log files), VLLM_CPU_THREADS (1),
# VLLM_BLOCK_SIZE (KV-cache block, tokens; 32).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VLLM_VENV:-$ROOT/.venv-vllm}
HOST=${VLLM_HOST:-127.0.0.1}
STATE_DIR=${VLLM_STATE_DIR:-${TMPDIR:-/tmp}/onellm-vllm}
START_TIMEOUT=${VLLM_START_TIMEOUT:-300}

die() { echo "vllm-serve: $*" >&2; exit 1; }

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

llm_dir() {
    local model=$1
    if [ -f "$model/llm/config.json" ]; then
        echo "$model/llm"
    elif [ -f "$model/config.json" ]; then
        echo "$model"
    else
        die "$model is neither a model folder (with llm/config.json) nor an LLM folder (with config.json)"
    fi
}

pid_file() { echo "$STATE_DIR/vllm-$1.pid"; }
log_file() { echo "$STATE_DIR/vllm-$1.log"; }

healthy() { curl -fsS --max-time 2 "http://$HOST:$1/health" >/dev/null 2>&1; }

# Sets MODEL, PORT and EXTRA (the arguments after `--`, for vLLM) from MODEL [PORT] [-- ...].
parse_model_args() {
    MODEL=$1; shift
    PORT=8000
    if [ $# -gt 0 ] && [ "$1" != "--" ]; then PORT=$1; shift; fi
    if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi
    EXTRA=("$@")
}

cmd_run() {
    parse_model_args "$@"
    local model port=$PORT
    model=$(llm_dir "$MODEL")
    [ -x "$VENV/bin/python" ] || die "$VENV is missing: run scripts/vllm-env.sh (make vllm-env) first"
    # The `vllm` console script is broken in the vllm-cpu distribution: run the module.
    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
    # vLLM shares the CPU with the gateway's encoder here. Its default layout pins a worker
    # process to one core, busy-polls there for a second after every step and runs OpenMP
    # threads that wait on each other: the gateway's torch threads then stall behind it (on 2
    # cores, 3.97 -> 5.1-6.0 gateway requests/s at 16 clients, docs/benchmarks.md). So: the
    # model runs inside the engine process (uni executor, which the CPU platform allows only
    # without V1 multiprocessing) on VLLM_CPU_THREADS threads, bound to no core.
    export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_OMP_THREADS_BIND=nobind
    export OMP_NUM_THREADS=${VLLM_CPU_THREADS:-1}
    # Only full KV blocks enter vLLM's prefix cache, and the CPU build's default block is 128
    # tokens: a chat's first turn (~115 rows with one attachment) never fills one, so its
    # follow-ups hit nothing. 32-token blocks cache all but the last few rows of every turn
    # (docs/benchmarks.md); GPU builds default to 16.
    exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
        --model "$model" \
        --distributed-executor-backend uni \
        --enable-prompt-embeds \
        --dtype "${VLLM_DTYPE:-float32}" \
        --max-model-len "${VLLM_MAX_MODEL_LEN:-2048}" \
        --block-size "${VLLM_BLOCK_SIZE:-32}" \
        --host "$HOST" --port "$port" \
        "${EXTRA[@]}"
}

cmd_start() {
    parse_model_args "$@"
    local port=$PORT
    llm_dir "$MODEL" >/dev/null
    mkdir -p "$STATE_DIR"
    if [ -f "$(pid_file "$port")" ] && kill -0 "$(cat "$(pid_file "$port")")" 2>/dev/null; then
        die "a vLLM started by this script already runs on port $port (pid $(cat "$(pid_file "$port")"))"
    fi
    # Its own session, so that `stop` can signal vLLM's whole process group (it forks
    # an engine core process that must go too).
    setsid "$0" run "$MODEL" "$port" -- "${EXTRA[@]}" >"$(log_file "$port")" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$(pid_file "$port")"
    echo "vllm-serve: started pid $pid on $HOST:$port, log $(log_file "$port")"
    local deadline=$((SECONDS + START_TIMEOUT))
    until healthy "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 40 "$(log_file "$port")" >&2
            rm -f "$(pid_file "$port")"
            die "vLLM exited before it became ready (log above)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 40 "$(log_file "$port")" >&2
            die "vLLM not ready after ${START_TIMEOUT}s (still running as pid $pid; stop it with: $0 stop $port)"
        fi
        sleep 2
    done
    echo "vllm-serve: ready at http://$HOST:$port"
}

cmd_stop() {
    local port=${1:-8000} pid
    [ -f "$(pid_file "$port")" ] || { echo "vllm-serve: nothing started on port $port"; return 0; }
    pid=$(cat "$(pid_file "$port")")
    if kill -TERM -- "-$pid" 2>/dev/null; then
        for _ in $(seq 30); do
            kill -0 -- "-$pid" 2>/dev/null || break
            sleep 1
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$(pid_file "$port")"
    echo "vllm-serve: stopped (pid $pid)"
}

cmd_status() {
    local port=${1:-8000}
    if healthy "$port"; then echo "vllm-serve: healthy at http://$HOST:$port"; else die "no healthy vLLM at http://$HOST:$port"; fi
}

[ $# -ge 1 ] || usage
command=$1; shift
case "$command" in
    run)    [ $# -ge 1 ] || usage; cmd_run "$@" ;;
    start)  [ $# -ge 1 ] || usage; cmd_start "$@" ;;
    stop)   cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    *)      usage ;;
esac
