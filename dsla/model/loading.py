"""Load a Hugging Face Llama directory (config.json + safetensors, single or sharded) into HybridLM."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dsla.config import LlamaConfig
from dsla.model.llama import HybridLM
from dsla.ops.rope import rope_inv_freq


def weight_files(teacher_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in a stable order."""
    teacher_dir = Path(teacher_dir)
    index = teacher_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [teacher_dir / n for n in names]
    single = teacher_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {teacher_dir}: dsla loads "
        "safetensors checkpoints only (convert .bin files with transformers' save_pretrained)")


def read_state_dict(teacher_dir: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(teacher_dir):
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ValueError(
                f"cannot read {f} ({e}): the file is truncated or corrupt; re-create it "
                "(for the default teacher: delete it and run `dsla prepare`)") from None
    return sd


def load_teacher(teacher_dir: str | Path, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> HybridLM:
    """Build a HybridLM with the teacher's weights (no DSLA layers yet), in eval mode, frozen."""
    teacher_dir = Path(teacher_dir)
    cfg = LlamaConfig.from_dir(teacher_dir)
    sd = read_state_dict(teacher_dir)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # some exports store the tied copy too
    with torch.device("meta"):  # no throw-away random init of 100M+ parameters
        model = HybridLM(cfg)
    model = model.to_empty(device=device)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # missing/unexpected names or shape mismatches
        raise ValueError(f"weights in {teacher_dir} do not match a Llama of its config.json: {e}") from None
    model = model.to(dtype=dtype)
    # to_empty left the (non-checkpoint) RoPE buffer uninitialised; it stays float32.
    model.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    model.eval().requires_grad_(False)
    return model


def teacher_hash(teacher_dir: str | Path) -> str:
    """sha256 over the checkpoint's weight files (names and bytes): the teacher's identity."""
    h = hashlib.sha256()
    for f in weight_files(Path(teacher_dir)):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()
