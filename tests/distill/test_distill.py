"""Chained distillation on a tiny random model: learning, order, resume, teacher identity."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dsla.config import DistillConfig, DSLAConfig
from dsla.distill import train as train_mod
from dsla.distill.artifact import load_student, read_manifest
from dsla.distill.rank import attention_entropy, order_from_scores, spearman
from dsla.model.loading import load_teacher

SHA = "0" * 64


def windows_fn(salt: int):
    def make(num: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 7 + salt)
        return torch.randint(3, 97, (num, 32), generator=g)
    return make


def tiny_cfg(**kw) -> DistillConfig:
    base = dict(dsla=DSLAConfig(feature_dim=8, chunk_size=8), seq_len=32, attn_sequences=8, attn_steps=4,
                val_sequences=2, batch_size=4, layer_kl_sequences=4, rank_sequences=4,
                e2e_steps=4, e2e_seq_len=32, e2e_windows=2, e2e_topk=8, e2e_save_every=2)
    base.update(kw)
    return DistillConfig(**base)


def sharpened_teacher(tiny_dir, dtype=torch.float32):
    """The tiny teacher as `run` distils from it."""
    model = load_teacher(tiny_dir)
    for block in model.model.layers:  # sharpen the random teacher's attention so there is something to learn
        block.self_attn.q_proj.weight.mul_(6.0)
    return model.to(dtype)


def run(tiny_dir, out, cfg, **kw):
    model = sharpened_teacher(tiny_dir)
    return model, train_mod.distill(model, tiny_dir, SHA, out, cfg, windows_fn(0), windows_fn(1),
                                    progress=False, **kw)


def test_training_lowers_the_layer_loss(tiny_dir, tmp_path):
    # Per-head objective, DSLA-specific parameters only: the held-out loss falls.
    _, m = run(tiny_dir, tmp_path / "s", tiny_cfg(attn_steps=20, train_projections=False))
    for i in m["layers_done"]:
        r = m["metrics"][str(i)]
        assert r["attn_val_nmse_after"] < r["attn_val_nmse_before"]


def test_training_with_projections_lowers_the_output_loss(tiny_dir, tmp_path):
    # q_proj/o_proj trainable, loss after o_proj. On random tokens a 3-layer random model has
    # nothing to generalise at this size (held-out loss stays flat), so check the fit itself.
    _, m = run(tiny_dir, tmp_path / "s", tiny_cfg(attn_steps=20, train_projections=True, proj_lr=1e-3))
    for i in m["layers_done"]:
        r = m["metrics"][str(i)]
        assert r["attn_train_loss_last"] < 0.8 * r["attn_train_loss_first"]


def test_chained_order_is_respected(tiny_dir, tmp_path, monkeypatch):
    seen = []
    real = train_mod.collect_layer_io

    def spy(model, layer, windows, dsla_layers, batch_size):
        seen.append((layer, list(dsla_layers), model.dsla_layers()))
        return real(model, layer, windows, dsla_layers, batch_size)

    monkeypatch.setattr(train_mod, "collect_layer_io", spy)
    _, m = run(tiny_dir, tmp_path / "s", tiny_cfg(order="given", layers=(2, 0, 1), val_sequences=0))
    assert m["order"] == [2, 0, 1]
    assert [(layer, conv) for layer, conv, _ in seen] == [(2, []), (0, [2]), (1, [2, 0])]


def test_kill_and_resume_equals_uninterrupted(tiny_dir, tmp_path, monkeypatch):
    cfg = tiny_cfg()
    _, full = run(tiny_dir, tmp_path / "full", cfg)

    calls = {"n": 0}
    real = train_mod.train_layer_kl_stage

    def dies_on_second_layer(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "train_layer_kl_stage", dies_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dir, tmp_path / "resumed", cfg)
    assert len(read_manifest(tmp_path / "resumed")["layers_done"]) == 1
    monkeypatch.setattr(train_mod, "train_layer_kl_stage", real)
    _, resumed = run(tiny_dir, tmp_path / "resumed", cfg)
    assert resumed["layers_done"] == full["layers_done"]
    a, b = load_file(tmp_path / "full" / "dsla.safetensors"), load_file(tmp_path / "resumed" / "dsla.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not list((tmp_path / "resumed").glob(".*tmp*")), "temporary files left behind"


def test_partial_artifact_is_usable_and_other_teacher_refused(tiny_dir, tmp_path):
    run(tiny_dir, tmp_path / "s", tiny_cfg(), max_layers=2)
    model = load_teacher(tiny_dir)
    m = load_student(model, tmp_path / "s", SHA)
    assert len(m["layers_done"]) == 2 and model.dsla_layers() == sorted(m["layers_done"])
    with torch.no_grad():
        out = model(torch.randint(0, 97, (1, 20)), dsla_layers=m["layers_done"])
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="another teacher|distilled from teacher"):
        load_student(load_teacher(tiny_dir), tmp_path / "s", "f" * 64)


def test_resume_with_other_config_is_refused(tiny_dir, tmp_path):
    run(tiny_dir, tmp_path / "s", tiny_cfg(), max_layers=1)
    with pytest.raises(ValueError, match="different config"):
        run(tiny_dir, tmp_path / "s", tiny_cfg(lr=1e-2))


def test_entropy_ranking_and_spearman(tiny_model):
    ent = attention_entropy(tiny_model, torch.randint(0, 97, (2, 16)))
    assert len(ent) == 3 and all(0 <= e <= torch.log(torch.tensor(16.0)) for e in ent)
    order = order_from_scores([0.3, 0.1, 0.2], "entropy")
    assert order == [1, 2, 0] and order_from_scores([0.3, 0.1, 0.2], "reverse") == [0, 2, 1]
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="order"):
        DistillConfig(order="random")
    with pytest.raises(ValueError, match="layers"):
        DistillConfig(order="given")
    with pytest.raises(ValueError, match="num_states"):
        DSLAConfig(num_states=3)


def test_compact_export_loads_to_the_same_model(tiny_dir, tmp_path):
    from dsla.distill.artifact import export_student

    run(tiny_dir, tmp_path / "s", tiny_cfg(e2e_steps=0))
    (tmp_path / "s" / "report.json").write_text("{}")
    export_student(tmp_path / "s", tmp_path / "c", sharpened_teacher(tiny_dir), SHA)
    assert (tmp_path / "c" / "report.json").is_file()
    assert any(k.endswith("_delta") for k in load_file(tmp_path / "c" / "dsla.safetensors"))
    outs = []
    for d in ("s", "c"):
        model = sharpened_teacher(tiny_dir)
        m = load_student(model, tmp_path / d, SHA)
        with torch.no_grad():
            outs.append(model(torch.arange(3, 40)[None], dsla_layers=m["layers_done"]))
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="distilled from teacher"):
        load_student(load_teacher(tiny_dir), tmp_path / "c", "f" * 64)


def test_low_rank_export_is_the_truncated_svd_and_full_rank_is_exact(tiny_dir, tmp_path):
    from dsla.distill.artifact import export_student

    run(tiny_dir, tmp_path / "s", tiny_cfg(e2e_steps=0))
    with pytest.raises(ValueError, match="--delta-rank 0: pass a positive rank"):
        export_student(tmp_path / "s", tmp_path / "r0", sharpened_teacher(tiny_dir), SHA, delta_rank=0)
    assert not (tmp_path / "r0").exists()
    full, src = sharpened_teacher(tiny_dir), sharpened_teacher(tiny_dir)
    m = load_student(src, tmp_path / "s", SHA)
    for r in (2, 1000):
        export_student(tmp_path / "s", tmp_path / f"r{r}", sharpened_teacher(tiny_dir), SHA, delta_rank=r)
        keys = load_file(tmp_path / f"r{r}" / "dsla.safetensors").keys()
        assert any(k.endswith("_delta_u") for k in keys) == (r == 2)
        model = sharpened_teacher(tiny_dir)
        load_student(model, tmp_path / f"r{r}", SHA)
        for i in m["layers_done"]:
            for name in ("q_proj", "o_proj"):
                w, w0 = (getattr(x.dsla[str(i)], name).weight.float() for x in (model, src))
                base = getattr(full.model.layers[i].self_attn, name).weight.float()
                d = w0 - base
                u, sv, vh = torch.linalg.svd(d)
                best = (u[:, :r] * sv[:r]) @ vh[:r] if r == 2 else d
                torch.testing.assert_close(w - base, best, rtol=0, atol=2e-2 * float(d.abs().max()))
    hidden = full.model.layers[0].self_attn.q_proj.weight.shape[1]  # square q/o: factors no smaller from hidden / 2
    for r, factored in ((hidden // 2 - 1, True), (hidden // 2, False)):
        export_student(tmp_path / "s", tmp_path / "rr", sharpened_teacher(tiny_dir), SHA, delta_rank=r)
        keys = load_file(tmp_path / "rr" / "dsla.safetensors").keys()
        assert any(k.endswith("_delta_u") for k in keys) == factored
        assert read_manifest(tmp_path / "rr")["compact"]["delta_rank"] == (r if factored else None)
    tensors = load_file(tmp_path / "r2" / "dsla.safetensors")
    tensors.pop(next(k for k in tensors if k.endswith("_delta_u")))
    from safetensors.torch import save_file
    save_file(tensors, tmp_path / "r2" / "dsla.safetensors")
    with pytest.raises(ValueError, match="without its other factor.*export it again"):
        load_student(sharpened_teacher(tiny_dir), tmp_path / "r2", SHA)


def test_export_leaves_out_untrained_projections_and_can_store_parameters_in_bfloat16(tiny_dir, tmp_path):
    from dsla.distill.artifact import export_student

    run(tiny_dir, tmp_path / "s", tiny_cfg(e2e_steps=0, train_projections=False, layer_kl_sequences=0))
    with pytest.raises(ValueError, match="--param-dtype 'float16'"):
        export_student(tmp_path / "s", tmp_path / "bad", sharpened_teacher(tiny_dir), SHA, param_dtype="float16")
    export_student(tmp_path / "s", tmp_path / "c", sharpened_teacher(tiny_dir), SHA, param_dtype="bfloat16")
    stored = load_file(tmp_path / "c" / "dsla.safetensors")
    done = read_manifest(tmp_path / "s")["layers_done"]
    assert not any("q_proj" in k or "o_proj" in k for k in stored)
    assert all(v.dtype == torch.bfloat16 for v in stored.values())
    assert sorted(read_manifest(tmp_path / "c")["compact"]["unchanged"]) == sorted(
        f"layers.{i}.{p}_proj.weight" for i in done for p in "qo")
    outs = []
    for d in ("s", "c"):
        model = sharpened_teacher(tiny_dir, torch.bfloat16)
        load_student(model, tmp_path / d, SHA)
        with torch.no_grad():
            outs.append(model(torch.arange(3, 40)[None], dsla_layers=done).float())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # bfloat16 parameters: what a bf16 model holds


def test_export_from_a_bfloat16_model_is_exact(tiny_dir, tmp_path):
    from dsla.distill.artifact import export_student

    _, m = run(tiny_dir, tmp_path / "s", tiny_cfg(e2e_steps=0))
    export_student(tmp_path / "s", tmp_path / "c", sharpened_teacher(tiny_dir, torch.bfloat16), SHA, param_dtype="bfloat16")
    stored = load_file(tmp_path / "c" / "dsla.safetensors")
    assert "layers.0.q_proj.weight" in stored and not any(k.endswith("_delta") for k in stored)
    outs = []
    for d in ("s", "c"):
        model = sharpened_teacher(tiny_dir, torch.bfloat16)
        load_student(model, tmp_path / d, SHA)
        with torch.no_grad():
            outs.append(model(torch.arange(3, 40)[None], dsla_layers=m["layers_done"]).float())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # a bf16 delta would round q/o a second time


def test_exact_groups_train_load_and_export(tiny_dir, tmp_path):
    """--exact-groups: the run's layers keep those KV groups exact (the end-to-end stage trains
    with them), the student loads with them, its export too, and a bad list is named."""
    from dsla.config import parse_exact_groups
    from dsla.distill.artifact import export_student

    assert parse_exact_groups(" 2:1, 0:0,2:0 ") == {0: (0,), 2: (0, 1)} and parse_exact_groups("") == {}
    assert tiny_cfg(exact_groups="2:1, 0:0,2:0,2:1").exact_groups == "0:0,2:0,2:1"  # one spelling: resumes compare equal
    for bad in ("2", "a:1", "2:-1", "2:1:0"):
        with pytest.raises(ValueError, match="LAYER:GROUP"):
            tiny_cfg(exact_groups=bad)
    model, m = run(tiny_dir, tmp_path / "s", tiny_cfg(exact_groups="2:1"))
    assert m["e2e"]["done"] and m["config"]["exact_groups"] == "2:1"
    assert model.dsla["2"].exact_groups == (1,) and all(model.dsla[str(i)].exact_groups == () for i in (0, 1))
    export_student(tmp_path / "s", tmp_path / "c", sharpened_teacher(tiny_dir), SHA)
    outs = []
    for d in ("s", "c"):
        fresh = sharpened_teacher(tiny_dir)
        load_student(fresh, tmp_path / d, SHA)
        assert fresh.dsla["2"].exact_groups == (1,)
        with torch.no_grad():
            outs.append(fresh(torch.arange(3, 40)[None], dsla_layers=[0, 1, 2]))
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="out of range"):
        run(tiny_dir, tmp_path / "t", tiny_cfg(exact_groups="2:5"))
    with pytest.raises(ValueError, match="not in the order"):
        run(tiny_dir, tmp_path / "u", tiny_cfg(order="given", layers=(0, 1), exact_groups="2:0"))
    # a run from this student may add exact groups, never drop them (their DSLA weights never trained)
    order = ",".join(map(str, m["order"]))
    given = dict(order="given", layers=tuple(m["order"]), e2e_steps=1)
    with pytest.raises(ValueError, match="2:1 exact"):
        run(tiny_dir, tmp_path / "v", tiny_cfg(**given, exact_groups="0:1"), init_from=tmp_path / "s")
    model, m2 = run(tiny_dir, tmp_path / "w", tiny_cfg(**given, exact_groups="2:1,0:1"), init_from=tmp_path / "s")
    assert m2["config"]["exact_groups"] == "0:1,2:1" and model.dsla["0"].exact_groups == (1,), order
    # every group of a layer exact and q/o not trained: that layer has nothing to learn, and the run
    # goes through (its loss has no gradient; it ran DSLA on those heads before, for nothing)
    model, m3 = run(tiny_dir, tmp_path / "x", tiny_cfg(exact_groups="2:0,2:1", train_projections=False,
                                                       e2e_steps=0))
    assert model.dsla["2"].dsla_groups == () and 2 in m3["layers_done"]


def test_decode_bench_measures_a_student(tiny_dir, tmp_path, monkeypatch):
    """`dsla bench decode --student`: the rows run the student's trained layers (exact groups
    included) in its order, and a ratio it cannot serve is refused by name."""
    from dsla.bench import decode
    from dsla.model.loading import teacher_hash

    model = sharpened_teacher(tiny_dir)
    train_mod.distill(model, tiny_dir, teacher_hash(tiny_dir), tmp_path / "s",
                      tiny_cfg(order="given", layers=(2, 0), exact_groups="2:1", e2e_steps=1),
                      windows_fn(0), windows_fn(1), progress=False)
    runner = decode.OursRunner(tiny_dir, torch.float32, "native", 0, tmp_path / "s")
    assert runner.model.dsla["2"].exact_groups == (1,) and runner.model.dsla_layers() == [0, 2]
    assert [runner.ratio_layers(r) for r in (0.0, 0.34, 0.67)] == [[], [2], [2, 0]]
    with pytest.raises(ValueError, match="needs 3 of 3 layers"):
        runner.ratio_layers(1.0)
    converted, fold = [], decode.OursRunner.batch_caches  # the layers the timed decode caches run as DSLA

    def spy(self, base, dsla_layers, batch):
        converted.append(list(dsla_layers))
        return fold(self, base, dsla_layers, batch)

    monkeypatch.setattr(decode.OursRunner, "batch_caches", spy)
    s = decode.DecodeSettings(impls=("ours",), dtypes=("float32",), prefill_lengths=(8,), contexts=(12,),
                              batches=(1,), dsla_ratios=(0.67,), steps=1, student=str(tmp_path / "s"))
    doc = decode.run_benchmark(tiny_dir, s)
    assert converted == [[2, 0]]  # the student's order, not the first layers
    rows = [r for r in doc["results"] if r["decode_ms_per_token"] is not None]
    assert [r["dsla_ratio"] for r in rows] == [0.67] and rows[0]["decode_ms_per_token"] > 0
    assert doc["student"]["exact_groups"] == "2:1" and doc["student"]["order"] == [2, 0]
    with pytest.raises(ValueError, match="needs 3 of 3 layers"):  # refused before anything is timed
        decode.run_benchmark(tiny_dir, decode.DecodeSettings(**{**s.__dict__, "dsla_ratios": (1.0,)}))
    with pytest.raises(ValueError, match="--dsla-window 64 with --student"):
        decode.DecodeSettings(student="s", dsla_window=64)
    with pytest.raises(ValueError, match="add ours to --impl"):
        decode.DecodeSettings(impls=("hf",), student="s")
