"""A student with an exact window (DSLAConfig.window): the CLI flag, training, save and load."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from dsla.cli import build_parser
from dsla.cliargs import dataclass_from_args
from dsla.config import DistillConfig, DSLAConfig
from dsla.distill.artifact import MANIFEST, load_student, read_manifest
from dsla.model.loading import load_teacher
from tests.distill.test_distill import SHA, run, tiny_cfg


def test_distill_window_flag():
    args = build_parser().parse_args(["distill", "--out", "x", "--window", "64"])
    assert dataclass_from_args(DistillConfig, args).dsla.window == 64
    args = build_parser().parse_args(["distill", "--out", "x"])
    assert dataclass_from_args(DistillConfig, args).dsla.window == 0


def test_window_student_trains_saves_and_loads(tiny_dir, tmp_path):
    cfg = tiny_cfg(dsla=DSLAConfig(feature_dim=8, chunk_size=8, window=4), layer_kl_sequences=0, e2e_steps=0)
    trained, m = run(tiny_dir, tmp_path / "s", cfg, max_layers=1)
    (layer,) = m["layers_done"]
    assert m["config"]["dsla"]["window"] == 4
    sd = load_file(tmp_path / "s" / "dsla.safetensors")
    scale = sd[f"layers.{layer}.window_log_scale"]
    assert scale.shape == (6,) and scale.abs().sum() > 0  # trained away from its init of 0
    model = load_teacher(tiny_dir)
    load_student(model, tmp_path / "s", SHA)
    mod = model.dsla[str(layer)]
    assert mod.cfg.window == 4 and mod.new_state().window == 4
    torch.testing.assert_close(mod.window_log_scale.detach(), scale)
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        for block in model.model.layers:  # as `run` did to the trained model
            block.self_attn.q_proj.weight.mul_(6.0)
        torch.testing.assert_close(model(ids, dsla_layers=[layer]), trained(ids, dsla_layers=[layer]))


def test_manifest_without_window_reads_as_window_0(tiny_dir, tmp_path):
    """Students saved before the window existed load (and resume) as pure DSLA."""
    run(tiny_dir, tmp_path / "s", tiny_cfg(layer_kl_sequences=0, e2e_steps=0), max_layers=1)
    p = tmp_path / "s" / MANIFEST
    m = json.loads(p.read_text())
    del m["config"]["dsla"]["window"]
    p.write_text(json.dumps(m))
    assert read_manifest(tmp_path / "s")["config"]["dsla"]["window"] == 0
    _, resumed = run(tiny_dir, tmp_path / "s", tiny_cfg(layer_kl_sequences=0, e2e_steps=0), max_layers=2)
    assert len(resumed["layers_done"]) == 2
