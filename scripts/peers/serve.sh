#!/usr/bin/env bash
# Start one server on 127.0.0.1 (in the foreground; exec, so its pid is this script's):
#   scripts/peers/serve.sh vllm     PORT [THREADS]          vLLM CPU, the prepared teacher dir, bfloat16
#   scripts/peers/serve.sh llamacpp PORT [THREADS] [GGUF]   llama-cpp-python's server (GGUF: q4_1, f16,
#                                                           bf16 (default) or a path)
#   scripts/peers/serve.sh dsla     PORT [THREADS]          dsla serve: the teacher, full attention, bfloat16
# Each serves the model as "SmolLM2-135M-Instruct" with an 8192-token context. Environment:
# DSLA_HOME, TEACHER_DIR, BIN (dsla's venv bin, default .venv/bin), VLLM_CPU_KVCACHE_SPACE (GiB of KV
# cache, default 4), VLLM_CPU_OMP_THREADS_BIND (default: cores 0..THREADS-1), VLLM_FLAGS,
# LLAMACPP_FLAGS, DSLA_FLAGS (extra flags for that server, e.g. VLLM_FLAGS=--enforce-eager to skip
# vLLM's torch.compile warm-up, which takes many minutes on a busy CPU; measure without it).
source "$(dirname "$0")/common.sh"
WHICH=${1:?usage: $0 vllm|llamacpp|dsla PORT [THREADS] [GGUF]}
PORT=${2:?usage: $0 vllm|llamacpp|dsla PORT [THREADS] [GGUF]}
THREADS=${3:-1}
NAME=SmolLM2-135M-Instruct
TEACHER_DIR=${TEACHER_DIR:-$DSLA_HOME/teachers/$NAME}
BIN=${BIN:-$(cd "$HERE/../.." && pwd)/.venv/bin}
[[ $THREADS =~ ^[1-9][0-9]*$ ]] || die "THREADS=$THREADS must be a positive integer"
[[ $PORT =~ ^[0-9]+$ ]] || die "PORT=$PORT must be a port number"

venv_python() {
  [ -x "$PEERS/$1/bin/python" ] || die "the $1 peer is not installed ($PEERS/$1): run scripts/peers/setup_$1.sh"
  echo "$PEERS/$1/bin/python"
}

case $WHICH in
  vllm)
    py=$(venv_python vllm) || exit 1
    [ -f "$TEACHER_DIR/config.json" ] || die "no prepared teacher at $TEACHER_DIR: run \`dsla prepare\` (or set TEACHER_DIR)"
    # The `vllm` console script fails (the distribution is named vllm-cpu): start the module.
    VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4} \
    VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$((THREADS - 1))} \
    HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
      exec "$py" -m vllm.entrypoints.launchers.api_server.entry --model "$TEACHER_DIR" \
      --served-model-name "$NAME" --dtype bfloat16 --max-model-len 8192 --host 127.0.0.1 --port "$PORT" \
      ${VLLM_FLAGS:-} ;;
  llamacpp)
    py=$(venv_python llamacpp) || exit 1
    gguf=${4:-bf16}
    [[ $gguf == *.gguf ]] || gguf=$PEERS/models/$NAME.$gguf.gguf
    [ -f "$gguf" ] || die "GGUF file $gguf is missing: run scripts/peers/setup_llamacpp.sh (or pass a path)"
    # interrupt_requests off: by default a new request cancels the one being streamed; queue it instead.
    exec "$py" -m llama_cpp.server --model "$gguf" --model_alias "$NAME" --n_ctx 8192 --interrupt_requests False \
      --n_threads "$THREADS" --n_threads_batch "$THREADS" --host 127.0.0.1 --port "$PORT" ${LLAMACPP_FLAGS:-} ;;
  dsla)
    [ -x "$BIN/dsla" ] || die "no $BIN/dsla: set BIN to the bin directory of dsla's venv"
    exec "$BIN/dsla" serve --threads "$THREADS" --port "$PORT" --dtype bfloat16 --policy static \
      --served-model-name "$NAME" ${TEACHER_DIR:+--teacher "$TEACHER_DIR"} ${DSLA_FLAGS:-} ;;
  *) die "unknown server $WHICH: choose vllm, llamacpp or dsla" ;;
esac
