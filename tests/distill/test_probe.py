"""Forward-only layer probe: local attention, per-layer costs, the retrieval-aware order."""

from __future__ import annotations

import pytest
import torch

from dsla.distill.probe import KeyPrompt, LocalAttention, greedy_layer_set, probe_layers, retrieval_aware_order
from dsla.ops.rope import rope_cos_sin


def test_local_attention_with_a_window_covering_everything_is_the_teacher(tiny_model):
    attn = tiny_model.model.layers[1].self_attn
    x = torch.randn(2 * 10, tiny_model.cfg.hidden_size)
    cos, sin = rope_cos_sin(torch.arange(10).repeat(2), tiny_model.inv_freq)
    full = attn(x, cos, sin, [10, 10])
    torch.testing.assert_close(LocalAttention(attn, window=10, sinks=0)(x, cos, sin, [10, 10]), full)
    torch.testing.assert_close(LocalAttention(attn, window=1, sinks=10)(x, cos, sin, [10, 10]), full)
    assert not torch.allclose(LocalAttention(attn, window=2, sinks=1)(x, cos, sin, [10, 10]), full)


def test_probe_measures_every_layer_and_restores_the_model(tiny_model):
    windows = torch.randint(0, 97, (2, 24))
    prompts = [KeyPrompt(tuple(torch.randint(0, 97, (20,)).tolist()), 16)]
    before = tiny_model.dsla_layers()
    res = probe_layers(tiny_model, windows, prompts, window=4, sinks=1)
    L = tiny_model.cfg.num_hidden_layers
    assert len(res["loss_delta"]) == len(res["key_logp_drop"]) == len(res["key_acc"]) == L
    assert tiny_model.dsla_layers() == before
    assert all(0.0 <= a <= 1.0 for a in res["key_acc"])


def test_retrieval_aware_order_puts_the_retrieval_layers_last():
    loss = [0.5, 0.1, 0.3, 0.2]
    key = [0.0, 2.0, 0.1, 1.0]
    assert retrieval_aware_order(loss, key, 0) == [1, 3, 2, 0]
    assert retrieval_aware_order(loss, key, 2) == [2, 0, 3, 1]
    with pytest.raises(ValueError, match="protect"):
        retrieval_aware_order(loss, key, 5)


def test_greedy_set_starts_from_the_single_layer_probe_and_restores_the_model(tiny_model):
    """Its first pick is the layer the one-layer probe finds cheapest (same cost); each later step
    measures the chosen layers together; the model's DSLA slots are untouched afterwards."""
    torch.manual_seed(0)
    windows = torch.randint(0, 97, (2, 24))
    prompts = [KeyPrompt(tuple(torch.randint(0, 97, (20,)).tolist()), 16)]
    tiny_model.add_dsla([0])  # a slot already in use must get its own module back
    try:
        before = dict(tiny_model.dsla.items())
        L = tiny_model.cfg.num_hidden_layers
        single = probe_layers(tiny_model, windows, prompts, window=3, sinks=1)
        cost = [d + 0.5 * k for d, k in zip(single["loss_delta"], single["key_logp_drop"])]
        res = greedy_layer_set(tiny_model, windows, prompts, count=L, window=3, sinks=1, key_weight=0.5)
        after = dict(tiny_model.dsla.items())
        assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
        assert sorted(res["order"]) == list(range(L))
        assert res["order"][0] == min(range(L), key=lambda i: cost[i])
        assert res["steps"][0]["cost"] == pytest.approx(min(cost), abs=1e-6)
        if L > 1:  # the last step restricts every layer: not the same as any one layer alone
            assert res["steps"][-1]["loss_delta"] != pytest.approx(single["loss_delta"][res["order"][-1]], abs=1e-6)
        # the one-layer probe's result stands for the first step: same choices, one pass per layer fewer
        reused = greedy_layer_set(tiny_model, windows, prompts, count=2, window=3, sinks=1, key_weight=0.5,
                                  single=single)
        assert reused["order"] == res["order"][:2]
        assert reused["steps"][1]["cost"] == pytest.approx(res["steps"][1]["cost"], abs=1e-6)
        with pytest.raises(ValueError, match="same window"):
            greedy_layer_set(tiny_model, windows, prompts, count=2, window=4, sinks=1, single=single)
        with pytest.raises(ValueError, match="count"):
            greedy_layer_set(tiny_model, windows, prompts, count=L + 1)
    finally:
        del tiny_model.dsla["0"]


def test_rank_refuses_greedy_without_the_retrieval_probe(tmp_path):
    import argparse

    from dsla.distill.commands import add_rank_arguments, run_rank

    p = argparse.ArgumentParser()
    add_rank_arguments(p)
    args = p.parse_args(["--out", str(tmp_path / "r.json"), "--metric", "entropy", "--greedy", "4"])
    with pytest.raises(ValueError, match="--greedy 4 needs --metric retrieval"):
        run_rank(args)
