"""Loss by position: per-token losses agree with a full forward; window selection and buckets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsla.config import DSLAConfig
from dsla.eval.position import bucket_label, buckets_for, run_position, select_windows, token_losses
from dsla.model.loading import load_teacher


def test_buckets():
    assert [bucket_label(*b) for b in buckets_for(8192)] == ["0-256", "256-1k", "1k-2k", "2k-4k", "4k-8k"]
    assert buckets_for(512) == [(0, 256), (256, 512)]


@pytest.mark.parametrize("layers", [[], [0, 2]])
def test_token_losses_equal_a_full_forward(tiny_dir, layers):
    model = load_teacher(tiny_dir)
    model.add_dsla([0, 2], DSLAConfig(feature_dim=8, chunk_size=8))
    w = torch.randint(3, 97, (300,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = F.cross_entropy(model(w[None], dsla_layers=layers)[0, :-1].float(), w[1:], reduction="none")
    got = token_losses(model, w, layers, chunk=64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_windows_come_from_single_long_documents_spread_over_them():
    docs = {"a": [np.arange(10), np.arange(100, 350)], "b": [np.arange(1000, 1130)]}
    w = select_windows(docs, 100, 10, seed=0)
    assert not w.concatenated and w.tokens.shape == (3, 100)
    assert sorted(w.sources) == ["a/doc1@0", "a/doc1@100", "b/doc0@0"]
    assert w.sources[-1] == "a/doc1@100"  # every document's start comes before second windows
    assert w.tokens[w.sources.index("a/doc1@0")].tolist() == list(range(100, 200))
    two = select_windows(docs, 100, 2, seed=0)
    assert sorted(two.sources) == ["a/doc1@0", "b/doc0@0"]
    assert select_windows(docs, 100, 2, seed=0).sources == two.sources
    assert {select_windows(docs, 100, 1, seed=s).sources for s in range(10)} == {("a/doc1@0",), ("b/doc0@0",)}


def test_short_documents_are_concatenated_and_flagged():
    docs = {"a": [np.arange(60), np.arange(60, 130)], "b": [np.arange(5)]}
    w = select_windows(docs, 100, 5, seed=0)
    assert w.concatenated and w.sources == ("a/concat@0",) and w.tokens[0].tolist() == list(range(100))
    with pytest.raises(ValueError, match="fewer than 500 tokens"):
        select_windows(docs, 500, 5, seed=0)


def test_run_position_reports_each_bucket(tiny_model):
    docs = {"a": [np.random.default_rng(0).integers(3, 97, 1200)]}
    w = select_windows(docs, 512, 2, seed=0)
    r = run_position(tiny_model, w)
    assert r["buckets"] == ["0-256", "256-512"] and r["windows"] == 2
    assert r["tokens"] == [512, 510] and len(r["loss"]) == len(r["se"]) == 2
    assert all(np.isfinite(r["loss"])) and all(np.isfinite(r["se"]))
