"""The end-to-end stage: top-k KL, mixed-precision optimiser, ratios, what trains, resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dsla.distill import e2e as e2e_mod
from dsla.distill.artifact import read_manifest
from dsla.distill.e2e import MasterAdam, ratio_ks, topk_kl
from tests.distill.test_distill import SHA, run, tiny_cfg


def dies_at_call(n: int):
    """``topk_kl`` that interrupts the run at its n-th call (one call per end-to-end step)."""
    real, calls = e2e_mod.topk_kl, {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)
    return dies


def test_topk_kl_with_the_whole_vocabulary_is_the_kl():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    lp = F.log_softmax(t, -1)
    top = lp.topk(11, -1)
    full = F.kl_div(F.log_softmax(s, -1), lp, log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(topk_kl(s, top.values, top.indices), full, rtol=1e-4, atol=1e-5)
    part = lp.topk(3, -1)
    assert float(topk_kl(s, part.values, part.indices)) >= 0
    assert float(topk_kl(t, part.values, part.indices)) == pytest.approx(0.0, abs=1e-5)


def test_ratio_ks_follow_round_and_the_layers_available():
    assert ratio_ks((0.25, 0.5, 0.75, 1.0), 30, 30) == [8, 15, 22, 30]
    assert ratio_ks((0.25, 0.5, 0.75, 1.0), 30, 15) == [8, 15]
    assert ratio_ks((0.5,), 30, 8) == []


def test_master_adam_moves_bfloat16_weights_that_plain_bfloat16_adam_cannot():
    w = torch.nn.Parameter(torch.full((4,), 256.0, dtype=torch.bfloat16))
    opt = MasterAdam([{"params": [w], "lr": 0.1}])
    for _ in range(10):  # each update (0.1) is below bfloat16's spacing at 256 (2.0)
        w.grad = torch.ones_like(w)
        opt.step()
    assert float(w[0].detach()) == pytest.approx(255.0, abs=1.01)  # the master copy accumulated the steps
    assert opt.masters[0][0].item() == pytest.approx(255.0, abs=0.05)


def test_e2e_lowers_the_kl_and_trains_only_the_converted_layers(tiny_dir, tmp_path):
    from dsla.model.loading import load_teacher
    cfg = tiny_cfg(e2e_steps=30, e2e_lr=1e-2, e2e_windows=2, e2e_ratios=(1.0,))
    frozen = {k: v.clone() for k, v in load_teacher(tiny_dir).state_dict().items()}
    model, m = run(tiny_dir, tmp_path / "s", cfg)
    losses = [loss for _, loss in m["e2e"]["losses"]]
    assert m["e2e"]["done"] and len(losses) == 30
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])
    for k, v in model.state_dict().items():  # teacher weights (q sharpened in `run`) never move
        if not k.startswith("dsla.") and "q_proj" not in k:
            torch.testing.assert_close(v, frozen[k], rtol=0, atol=0)
    assert not (tmp_path / "s" / e2e_mod.E2E_STATE).exists()


@pytest.mark.parametrize("window", [0, 4])
def test_e2e_draws_k_from_the_ratios(tiny_dir, tmp_path, window):
    from dsla.config import DSLAConfig
    dsla = DSLAConfig(feature_dim=8, chunk_size=8, window=window)
    _, m = run(tiny_dir, tmp_path / "s", tiny_cfg(e2e_steps=12, e2e_ratios=(0.34, 1.0), dsla=dsla))
    assert {k for k, _ in m["e2e"]["losses"]} == {1, 3}


def test_e2e_kill_and_resume_equals_uninterrupted(tiny_dir, tmp_path, monkeypatch):
    cfg = tiny_cfg(e2e_steps=6, e2e_save_every=2)
    run(tiny_dir, tmp_path / "full", cfg)
    monkeypatch.setattr(e2e_mod, "topk_kl", dies_at_call(5))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dir, tmp_path / "resumed", cfg)
    assert read_manifest(tmp_path / "resumed")["e2e"]["step"] == 4
    monkeypatch.undo()
    _, m = run(tiny_dir, tmp_path / "resumed", cfg)
    assert m["e2e"]["step"] == 6 and m["e2e"]["done"]
    a, b = load_file(tmp_path / "full" / "dsla.safetensors"), load_file(tmp_path / "resumed" / "dsla.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert read_manifest(tmp_path / "full")["e2e"]["losses"] == m["e2e"]["losses"]
    assert m["teacher"]["sha256"] == SHA


def test_lr_multiplier_follows_the_first_schedule_then_warms_up_an_extension():
    from dsla.distill.e2e import lr_multiplier, warmup_cosine
    first = [[0, 20]]
    assert [lr_multiplier(first, s) for s in range(20)] == [warmup_cosine(20)(s) for s in range(20)]
    ext = [[0, 20], [20, 40]]
    assert lr_multiplier(ext, 5) == warmup_cosine(20)(5)
    assert lr_multiplier(ext, 20) == pytest.approx(warmup_cosine(40)(20) / 2)  # warm-up over 2 steps
    assert lr_multiplier(ext, 30) == warmup_cosine(40)(30)
    assert lr_multiplier(ext, 39) < lr_multiplier(ext, 30)


def test_e2e_extends_a_finished_stage_and_refuses_fewer_steps(tiny_dir, tmp_path):
    cfg = tiny_cfg(e2e_steps=4)
    _, m = run(tiny_dir, tmp_path / "s", cfg)
    first = load_file(tmp_path / "s" / "dsla.safetensors")
    _, m2 = run(tiny_dir, tmp_path / "s", tiny_cfg(e2e_steps=7))
    assert m2["e2e"]["done"] and m2["e2e"]["step"] == 7
    assert m2["e2e"]["losses"][:4] == m["e2e"]["losses"] and len(m2["e2e"]["losses"]) == 7
    assert m2["e2e"]["schedule"] == [[0, 4], [4, 7]] and m2["config"]["e2e_steps"] == 7
    after = load_file(tmp_path / "s" / "dsla.safetensors")
    assert any(not torch.equal(first[k], after[k]) for k in first)
    with pytest.raises(ValueError, match="--e2e-steps 7 or more"):
        run(tiny_dir, tmp_path / "s", tiny_cfg(e2e_steps=5))
    with pytest.raises(ValueError, match="different config.*seq_len"):
        run(tiny_dir, tmp_path / "s", tiny_cfg(e2e_steps=7, seq_len=24))


def test_init_from_takes_a_students_layers_to_another_window(tiny_dir, tmp_path, monkeypatch):
    from dsla.config import DSLAConfig
    from dsla.distill import train as train_mod
    order = dict(order="given", layers=(2, 0, 1))
    src_cfg = tiny_cfg(dsla=DSLAConfig(feature_dim=8, chunk_size=8, window=4), **order)
    run(tiny_dir, tmp_path / "src", src_cfg)
    src = load_file(tmp_path / "src" / "dsla.safetensors")
    monkeypatch.setattr(train_mod, "collect_layer_io", lambda *a, **k: pytest.fail("the layer-wise stage ran"))
    cfg = tiny_cfg(dsla=DSLAConfig(feature_dim=8, chunk_size=8, window=8), e2e_steps=3, **order)
    _, m = run(tiny_dir, tmp_path / "new", cfg, init_from=tmp_path / "src")
    assert m["layers_done"] == [2, 0, 1] and m["config"]["dsla"]["window"] == 8
    assert m["init_from"]["path"] == str((tmp_path / "src").resolve()) and m["e2e"]["done"]
    assert len(m["e2e"]["losses"]) == 3
    inherited = load_file(tmp_path / "new" / "stage1" / "dsla.safetensors")  # before its own end-to-end stage
    assert inherited.keys() == src.keys() and all(torch.equal(inherited[k], src[k]) for k in src)
    assert read_manifest(tmp_path / "new" / "stage1")["config"]["dsla"]["window"] == 8
    assert m["init_from"]["config"]["dsla"]["window"] == 4 and m["init_from"]["e2e"]["step"] == 4
    monkeypatch.setattr(train_mod, "start_from", lambda *a, **k: pytest.fail("started again"))
    monkeypatch.setattr(train_mod, "train_e2e", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.chdir(tmp_path)  # the same source, spelled relative to here: resumes, with nothing left to do
    _, again = run(tiny_dir, tmp_path / "new", cfg, init_from="src")
    assert again["e2e"]["losses"] == m["e2e"]["losses"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="not from --init-from"):
        run(tiny_dir, tmp_path / "new", cfg, init_from=tmp_path / "other")
    shutil.copytree(tmp_path / "src", tmp_path / "src8")  # a source extended to 8 end-to-end steps, killed at 6
    monkeypatch.setattr(e2e_mod, "topk_kl", dies_at_call(3))  # step 7
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dir, tmp_path / "src8", tiny_cfg(dsla=src_cfg.dsla, e2e_steps=8, **order))
    monkeypatch.undo()
    w8 = DSLAConfig(feature_dim=8, chunk_size=8, window=8)
    bad = [(dict(dsla=DSLAConfig(feature_dim=4, chunk_size=8, window=8), **order), {}, "feature_dim=8.*only --window"),
           (dict(dsla=DSLAConfig(feature_dim=8, chunk_size=8, window=0), **order), {}, "both windows must be nonzero"),
           (dict(dsla=w8, order="given", layers=(0, 1, 2)), {}, "--layers 2,0,1"),
           (dict(dsla=w8, **order), {"max_layers": 2}, "--max-layers 2 is below the 3 layers"),
           (dict(dsla=w8, **order), {"src": "src8"}, "stopped at step 6 of 8; finish it first")]
    for i, (kw, extra, match) in enumerate(bad):
        src_dir = tmp_path / extra.pop("src", "src")
        with pytest.raises(ValueError, match=match):
            run(tiny_dir, tmp_path / f"bad{i}", tiny_cfg(**kw), init_from=src_dir, **extra)
        assert not (tmp_path / f"bad{i}").exists()


def test_e2e_killed_between_the_weights_and_the_manifest_resumes_from_the_weights(tiny_dir, tmp_path, monkeypatch):
    from dsla.distill import artifact
    cfg = tiny_cfg(e2e_steps=6, e2e_save_every=2)
    run(tiny_dir, tmp_path / "full", cfg)
    real = artifact.atomic_write_json

    def dies_on_the_step_4_manifest(path, obj):  # after the weights of step 4 are written
        if path.parent == tmp_path / "cut" and (obj.get("e2e") or {}).get("step") == 4:
            raise KeyboardInterrupt
        return real(path, obj)

    monkeypatch.setattr(artifact, "atomic_write_json", dies_on_the_step_4_manifest)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dir, tmp_path / "cut", cfg)
    monkeypatch.setattr(artifact, "atomic_write_json", real)
    assert json.loads((tmp_path / "cut" / "manifest.json").read_text())["e2e"]["step"] == 2  # behind the weights
    assert read_manifest(tmp_path / "cut")["e2e"]["step"] == 4  # the weights' copy
    _, m = run(tiny_dir, tmp_path / "cut", cfg)
    a, b = load_file(tmp_path / "full" / "dsla.safetensors"), load_file(tmp_path / "cut" / "dsla.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert read_manifest(tmp_path / "full")["e2e"]["losses"] == m["e2e"]["losses"]


def test_e2e_scalars_trains_only_the_heads_weights_and_gate_biases(tiny_dir, tmp_path):
    from dsla.config import SCALAR_PARAMS, DSLAConfig
    kw = dict(dsla=DSLAConfig(feature_dim=8, chunk_size=8, window=4), order="given", layers=(2, 0, 1))
    run(tiny_dir, tmp_path / "src", tiny_cfg(e2e_steps=0, **kw))
    before = load_file(tmp_path / "src" / "dsla.safetensors")
    cfg = tiny_cfg(e2e_steps=6, e2e_lr=3e-2, e2e_params="scalars", **kw)
    model, m = run(tiny_dir, tmp_path / "new", cfg, init_from=tmp_path / "src")
    assert m["config"]["e2e_params"] == "scalars" and m["e2e"]["done"]
    after = load_file(tmp_path / "new" / "dsla.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    scalar = {k for k in before if k.split(".", 2)[2] in SCALAR_PARAMS}
    assert scalar and moved == scalar  # every scalar moved, nothing else did
    for name, p in model.dsla.named_parameters():  # frozen again, and no gradient went anywhere else
        assert not p.requires_grad and (p.grad is None or name.split(".", 1)[1] in SCALAR_PARAMS), name
    with pytest.raises(ValueError, match="e2e_params='some'"):
        tiny_cfg(e2e_params="some")


def test_e2e_dsla_trains_everything_but_q_and_o_with_its_own_weight_lr(tiny_dir, tmp_path, monkeypatch):
    from dsla.config import SCALAR_PARAMS, DSLAConfig
    from dsla.distill import e2e
    kw = dict(dsla=DSLAConfig(feature_dim=8, chunk_size=8, window=4), order="given", layers=(2, 0, 1))
    run(tiny_dir, tmp_path / "src", tiny_cfg(e2e_steps=0, **kw))
    before = load_file(tmp_path / "src" / "dsla.safetensors")
    lrs, real_step = [], e2e.MasterAdam.step

    def step(self):  # the lr each group trains with, step by step
        lrs.append([g["lr"] for g in self.param_groups])
        real_step(self)
    monkeypatch.setattr(e2e.MasterAdam, "step", step)
    cfg = tiny_cfg(e2e_steps=6, e2e_lr=3e-2, e2e_weight_lr=1e-3, e2e_params="dsla", **kw)
    model, m = run(tiny_dir, tmp_path / "new", cfg, init_from=tmp_path / "src")
    after = load_file(tmp_path / "new" / "dsla.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    proj = {k for k in before if k.split(".", 2)[2] in ("q_proj.weight", "o_proj.weight")}
    assert proj and moved == set(before) - proj  # every DSLA parameter moved, q / o did not
    assert len(lrs) == 6 and all(len(g) == 2 and g[0] > 0 and g[0] == pytest.approx(30 * g[1]) for g in lrs)
    assert max(g[0] for g in lrs) <= 3e-2 and lrs[0] != lrs[-1]  # scheduled from each group's own peak
    mods = [model.dsla[str(i)] for i in (2, 0, 1)]
    scalars, weights = e2e.param_groups(mods, cfg)
    assert (scalars["peak_lr"], weights["peak_lr"]) == (3e-2, 1e-3)
    names = {id(p): n.split(".", 1)[1] for n, p in model.dsla.named_parameters()}
    assert {names[id(p)] for p in scalars["params"]} <= set(SCALAR_PARAMS)
    assert not {names[id(p)] for p in weights["params"]} & (set(SCALAR_PARAMS) | {"q_proj.weight", "o_proj.weight"})
    saved_order = {  # the order runs made before e2e_weight_lr saved their optimiser state in (by index)
        "all": [p for m in mods for p in m.parameters()],
        "dsla": [p for m in mods for n, p in m.named_parameters() if n not in ("q_proj.weight", "o_proj.weight")],
        "scalars": [p for m in mods for n, p in m.named_parameters() if n in SCALAR_PARAMS]}
    for which, order in saved_order.items():  # without e2e_weight_lr: one group, in that order
        one, = e2e.param_groups(mods, tiny_cfg(e2e_params=which, **kw))
        assert one["peak_lr"] == tiny_cfg().e2e_lr
        assert [id(p) for p in one["params"]] == [id(p) for p in order]
    with pytest.raises(ValueError, match="e2e_weight_lr=0.001 .* trains none"):
        tiny_cfg(e2e_params="scalars", e2e_weight_lr=1e-3)


def test_export_drops_every_local_path_of_an_init_from_chain(tiny_dir, tmp_path):
    from dsla.config import DSLAConfig
    from dsla.distill.artifact import export_student
    from dsla.model.loading import load_teacher
    kw = dict(dsla=DSLAConfig(feature_dim=8, chunk_size=8, window=4), order="given", layers=(2, 0, 1))
    run(tiny_dir, tmp_path / "a", tiny_cfg(e2e_steps=0, **kw))
    run(tiny_dir, tmp_path / "b", tiny_cfg(e2e_steps=1, e2e_params="scalars", **kw), init_from=tmp_path / "a")
    run(tiny_dir, tmp_path / "c", tiny_cfg(e2e_steps=1, e2e_params="dsla", **kw), init_from=tmp_path / "b")
    assert read_manifest(tmp_path / "c")["init_from"]["init_from"]["path"]  # the chain, with its paths
    export_student(tmp_path / "c", tmp_path / "ship", load_teacher(tiny_dir), SHA)
    chain, depth = read_manifest(tmp_path / "ship")["init_from"], 0
    while chain:
        assert "path" not in chain and chain["weights_sha256"]
        chain, depth = chain.get("init_from"), depth + 1
    assert depth == 2


def test_a_run_from_before_a_setting_existed_resumes_with_its_default(tmp_path):
    from dsla.distill.artifact import config_dict
    from dsla.distill.train import check_resumable
    old = config_dict(tiny_cfg())
    del old["e2e_params"]  # a manifest written before the setting existed
    check_resumable(tmp_path, {"config": dict(old)}, tiny_cfg())  # the default: resumes
    with pytest.raises(ValueError, match=r"different config \(e2e_params\)"):
        check_resumable(tmp_path, {"config": dict(old)}, tiny_cfg(e2e_params="scalars"))
