"""Smoke tests of the benchmarks on tiny shapes: they run, and write the documented JSON atomically.

No timing assertions: speed is measured by `dsla bench`, not by the test suite.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from dsla.bench import common, decode, layer

NUM = (int, float)



def parse(module, argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


def only_json_left(folder, name):
    """The output exists and no temp file of the atomic writer was left beside it."""
    assert sorted(p.name for p in folder.iterdir()) == [name]


def test_measure_median_and_budget():
    calls = []
    t = common.measure(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and t.repeats == 3 and t.median >= 0
    t = common.measure(lambda: None, warmup=0, repeats=100, max_seconds=0.0)
    assert t.repeats == 1  # the budget stops early but one timed call is always made


def test_rss_readings_are_positive():
    common.reset_peak_rss()
    assert 0 < common.current_rss_mb() <= common.peak_rss_mb() + 1


def test_json_writer_is_atomic(tmp_path):
    out = tmp_path / "r.json"
    common.write_json_atomic(out, {"a": 1})
    with pytest.raises(TypeError):
        common.write_json_atomic(out, {"a": object()})  # fails half-way through serialising
    assert json.loads(out.read_text()) == {"a": 1}  # the old file survives intact
    only_json_left(tmp_path, "r.json")


def test_table_and_lists():
    text = common.format_table([{"a": 1.23456, "b": None}, {"a": 1234.5, "b": "x"}], ["a", "b"])
    assert text.splitlines()[2].split() == ["1.23", "-"] and "1234" in text
    assert common.parse_list("512, 2048", int) == [512, 2048]
    with pytest.raises(ValueError, match="abc"):
        common.parse_list("1,abc", int)


def test_decode_bench_schema(tiny_dir, tmp_path):
    out = tmp_path / "decode.json"
    args = parse(decode, ["--json", str(out), "--teacher", str(tiny_dir), "--dtype-list", "float32",
                          "--prefill-lengths", "8,16", "--contexts", "12,16", "--batches", "1,2", "--steps", "2"])
    assert decode.run(args) == 0
    only_json_left(tmp_path, "decode.json")
    doc = json.loads(out.read_text())
    assert {"machine", "settings", "results", "summary"} <= doc.keys()
    assert {"torch", "torch_threads", "cpu", "transformers"} <= doc["machine"].keys()
    rows = doc["results"]
    assert len(rows) == 2 * (2 + 2 * 2)  # impls x (prefill lengths + contexts x batches)
    for r in rows:
        assert r["impl"] in ("ours", "hf") and r["dtype"] == "float32" and r["dsla_ratio"] == 0.0
        assert isinstance(r["batch"], int) and isinstance(r["context"], int)
        assert isinstance(r["peak_rss_mb"], NUM) and isinstance(r["rss_delta_mb"], NUM)
        if r["prefill_tokens_per_s"] is not None:  # a prefill row
            assert r["decode_ms_per_token"] is None and r["batch"] == 1 and r["context"] in (8, 16)
            assert r["prefill_tokens_per_s"] > 0
        else:
            assert r["decode_ms_per_token"] > 0 and r["context"] in (12, 16)  # 16: from a cropped prefill
            assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["decode_ms_per_token"], rel=0.05)
    assert {(s["batch"], s["context"]) for s in doc["summary"]} == {(1, 12), (2, 12), (1, 16), (2, 16)}
    assert all("hf_over_ours" in s for s in doc["summary"])


def test_decode_bench_dsla_axis(tiny_dir):
    s = decode.DecodeSettings(impls=("ours",), dtypes=("float32",), prefill_lengths=(8,), contexts=(12,),
                              batches=(2,), dsla_ratios=(0.0, 1.0), steps=2, warmup_steps=1, prefill_repeats=1,
                              dsla_window=4)
    doc = decode.run_benchmark(tiny_dir, s)
    assert doc["settings"]["dsla_window"] == 4
    assert [(r["dsla_ratio"], r["decode_ms_per_token"] is None) for r in doc["results"]] == [
        (0.0, True), (0.0, False), (1.0, True), (1.0, False)]
    assert "dsla1_throughput_over_attention" in doc["summary"][0]


def test_decode_bench_weights_axis(tmp_path):
    from tests.conftest import make_tiny_hf_dir

    make_tiny_hf_dir(tmp_path, hidden_size=64, intermediate_size=128, head_dim=16, num_attention_heads=4,
                     num_key_value_heads=2)  # input dims that are multiples of 32, so int4 applies
    s = decode.DecodeSettings(impls=("ours",), dtypes=("float32", "bfloat16"), prefill_lengths=(8,), contexts=(12,),
                              batches=(2,), weights=("native", "int8", "int4"), dsla_ratios=(0.0, 1.0), steps=2,
                              warmup_steps=1, prefill_repeats=1)
    doc = decode.run_benchmark(tmp_path, s)
    got = {(r["dtype"], r["weights"], r["dsla_ratio"]) for r in doc["results"]}
    assert got == {("float32", "native", 0.0), ("float32", "native", 1.0)} | {
        ("bfloat16", w, r) for w in ("native", "int8", "int4") for r in (0.0, 1.0)}
    assert len(doc["skipped"]) == 2 and all("float32" in m and "bfloat16" in m for m in doc["skipped"])
    by_w = {r["weights"]: r["weights_mb"] for r in doc["results"] if r["dtype"] == "bfloat16"}
    assert by_w["int4"] < by_w["int8"] < by_w["native"]
    q = [e for e in doc["summary"] if e["weights"] == "int4"]
    assert len(q) == 1 and "native_over_int4" in q[0] and "dsla1_throughput_over_attention" in q[0]
    with pytest.raises(ValueError, match="weights-list"):
        decode.DecodeSettings(weights=("int3",))


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bfloat16 here")
def test_decode_bench_packed_and_mixed_rows(tmp_path):
    from tests.conftest import make_tiny_hf_dir

    make_tiny_hf_dir(tmp_path, hidden_size=64, intermediate_size=128, head_dim=16, num_attention_heads=4,
                     num_key_value_heads=2)
    s = decode.DecodeSettings(impls=("ours",), dtypes=("bfloat16",), prefill_lengths=(8,), contexts=(12,),
                              batches=(2,), weights=("packed", "mixed"), steps=2, warmup_steps=1, prefill_repeats=1)
    doc = decode.run_benchmark(tmp_path, s)
    assert {r["weights"] for r in doc["results"]} == {"packed", "mixed"} and not doc["skipped"]
    assert all(r["decode_ms_per_token"] > 0 for r in doc["results"] if r["context"] == 12)


def test_decode_settings_reject_bad_values():
    with pytest.raises(ValueError, match="leave no prefill"):
        decode.DecodeSettings(contexts=(10,), steps=16)
    with pytest.raises(ValueError, match="impl"):
        decode.DecodeSettings(impls=("vllm",))
    with pytest.raises(ValueError, match="dsla-window -1"):
        decode.DecodeSettings(dsla_window=-1)


def test_layer_bench_schema(tmp_path):
    from dsla.config import DSLAConfig, LlamaConfig

    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    s = layer.LayerSettings(dtypes=("float32", "bfloat16"), prefill_lengths=(16, 40), contexts=(24, 100),
                            repeats=1, steps=2, warmup_steps=1)
    doc = layer.run_benchmark(s, llama_cfg=cfg, dsla_cfg=DSLAConfig(feature_dim=8, chunk_size=16))
    out = common.write_json_atomic(tmp_path / "layer.json", doc)
    only_json_left(tmp_path, "layer.json")
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert len(rows) == 2 * (2 + 2)
    pre = [r for r in rows if r["kind"] == "prefill"]
    dec = [r for r in rows if r["kind"] == "decode"]
    assert len(pre) == len(dec) == 4
    for r in pre:
        assert set(r) == {"kind", "dtype", "tokens", "attention_ms", "dsla_ms", "dsla_speedup", "attention_cpu_ms",
                          "dsla_cpu_ms", "dsla_speedup_cpu"}
        assert r["dsla_ms"] > 0 and r["dsla_speedup"] == pytest.approx(r["attention_ms"] / r["dsla_ms"], rel=0.02, abs=2e-3)
    for r in dec:
        assert {"context", "attention_step_ms", "dsla_step_ms", "kv_cache_bytes", "dsla_state_bytes",
                "kv_over_state_bytes", "fold_ms", "kv_allocated_bytes"} <= r.keys()
        assert isinstance(r["kv_cache_bytes"], int) and isinstance(r["dsla_state_bytes"], int)
    # KV grows with the context, the DSLA state does not
    f32 = {r["context"]: r for r in dec if r["dtype"] == "float32"}
    assert f32[100]["kv_cache_bytes"] > f32[24]["kv_cache_bytes"]
    assert f32[100]["dsla_state_bytes"] == f32[24]["dsla_state_bytes"]
    assert [e["dtype"] for e in doc["summary"]] == ["float32", "bfloat16"]
    assert set(doc["summary"][0]["dsla_prefill_speedup"]) == {"16", "40"}
    assert "dsla_decode_ratio_last_over_first" in doc["summary"][0]
