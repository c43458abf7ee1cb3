"""Our Llama against transformers', and the cache invariants of the flattened-batch forward."""

from __future__ import annotations

import json

import pytest
import torch

from dsla.model.loading import load_teacher
from tests.conftest import make_tiny_hf_dir


@pytest.mark.parametrize("tie,rope", [
    (True, None),
    (False, None),
    (True, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}),
], ids=["tied", "untied", "llama3-rope"])
def test_logits_match_transformers(tmp_path, tie, rope):
    hf = make_tiny_hf_dir(tmp_path, tie=tie, rope_scaling=rope)
    ours = load_teacher(tmp_path)
    ids = torch.randint(0, 97, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def decode_all(model, ids, chunks, dsla_layers=()):
    """Feed ``ids`` through a cache in the given chunk lengths; return all logits (T, vocab)."""
    cache = model.new_cache(dsla_layers)
    out, start = [], 0
    for L in chunks:
        out.append(model(ids[start: start + L], [L], [cache]))
        start += L
    assert cache.num_tokens == len(ids)
    return torch.cat(out)


def test_cached_prefill_then_decode_equals_full_forward(tiny_model):
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = tiny_model(ids[None])[0]
        stepped = decode_all(tiny_model, ids, [25] + [1] * 15)
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunks", [[40], [1] * 40, [7, 13, 20], [39, 1], [16, 16, 8]])
def test_any_prefill_split_gives_same_logits(tiny_model, chunks):
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = tiny_model(ids[None])[0]
        got = decode_all(tiny_model, ids, chunks)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)


def test_variable_length_batch_equals_each_alone(tiny_model):
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (5, 17, 1, 30)]
    with torch.no_grad():
        alone = [tiny_model(s[None])[0] for s in seqs]
        batched = tiny_model(torch.cat(seqs), [len(s) for s in seqs])  # stateless, ragged
        # and with caches, after a shared prefix step: prefill + decode mixed in one forward
        caches = [tiny_model.new_cache() for _ in seqs]
        first = tiny_model(torch.cat([s[:-1] for s in seqs if len(s) > 1]),
                           [len(s) - 1 for s in seqs if len(s) > 1], [c for c, s in zip(caches, seqs) if len(s) > 1])
        last = tiny_model(torch.cat([s[-1:] if len(s) > 1 else s for s in seqs]), [1] * len(seqs), caches)
    torch.testing.assert_close(batched, torch.cat(alone), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, torch.stack([a[-1] for a in alone]), rtol=1e-4, atol=1e-4)
    assert first.shape[0] == sum(len(s) - 1 for s in seqs)


def test_bf16_model_runs_and_is_close(tiny_dir):
    m32, m16 = load_teacher(tiny_dir), load_teacher(tiny_dir, dtype=torch.bfloat16)
    ids = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = m32(ids), m16(ids).float()
    assert b.dtype == torch.float32 and m16.inv_freq.dtype == torch.float32
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_context_limit_is_enforced(tiny_model):
    cache = tiny_model.new_cache()
    cache.num_tokens = tiny_model.cfg.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        tiny_model(torch.tensor([3]), [1], [cache])


def edit_config(path, **kv):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(kv)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("field,value", [("model_type", "mistral"), ("attention_bias", True),
                                         ("mlp_bias", True), ("hidden_act", "gelu")])
def test_unsupported_config_names_the_field(tmp_path, field, value):
    make_tiny_hf_dir(tmp_path)
    edit_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=field):
        load_teacher(tmp_path)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    make_tiny_hf_dir(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_teacher(tmp_path)


def test_wrong_shapes_are_a_clear_error(tmp_path):
    make_tiny_hf_dir(tmp_path)
    edit_config(tmp_path, intermediate_size=64)
    with pytest.raises(ValueError, match="do not match"):
        load_teacher(tmp_path)


def test_missing_teacher_says_run_prepare(tmp_path, monkeypatch):
    from dsla.paths import resolve_teacher

    monkeypatch.setenv("DSLA_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dsla prepare"):
        resolve_teacher(None)
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_teacher(tmp_path / "nowhere")
