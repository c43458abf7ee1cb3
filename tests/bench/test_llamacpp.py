"""llama.cpp rows of `dsla bench decode` without llama.cpp: a fake worker speaks the protocol.

No peer venv, no network: ``peer_python`` and the worker script are pointed at this Python and
tests/bench/fake_llamacpp_worker.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from dsla.bench import decode, llamacpp

FAKE = Path(__file__).with_name("fake_llamacpp_worker.py")



@pytest.fixture
def peers(tmp_path, monkeypatch):
    """A DSLA_HOME whose peers/ has fake GGUF files, and the fake worker in place of the real one."""
    monkeypatch.setenv("DSLA_HOME", str(tmp_path))
    models = tmp_path / "peers" / "models"
    models.mkdir(parents=True)
    for name in ("q4_1", "bf16"):
        (models / f"SmolLM2-135M-Instruct.{name}.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(llamacpp, "peer_python", lambda name="llamacpp": Path(sys.executable))
    monkeypatch.setattr(llamacpp, "WORKER", FAKE)
    return tmp_path


def test_group_ggufs():
    assert llamacpp.group_ggufs(["bf16", "q4_1", "f16"], ["float32", "bfloat16"]) == {
        "float32": ["q4_1", "f16"], "bfloat16": ["bf16"]}
    # a GGUF whose dtype is not run, and a path, join the first dtype
    assert llamacpp.group_ggufs(["bf16", "/m/x.gguf"], ["float32"]) == {"float32": ["bf16", "/m/x.gguf"]}


def test_gguf_paths_and_errors(peers):
    assert llamacpp.gguf_path("q4_1").name == "SmolLM2-135M-Instruct.q4_1.gguf"
    with pytest.raises(FileNotFoundError, match="setup_llamacpp.sh"):
        llamacpp.gguf_path("f16")
    with pytest.raises(ValueError, match="'q8'.*q4_1"):
        llamacpp.gguf_path("q8")
    with pytest.raises(FileNotFoundError, match="existing .gguf"):
        llamacpp.gguf_path(str(peers / "nope.gguf"))
    assert llamacpp.gguf_label("/a/b/model.Q4_K.gguf") == "model.Q4_K"


def test_missing_peer_venv_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("DSLA_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="setup_llamacpp.sh"):
        llamacpp.peer_python()


def test_worker_errors_carry_the_worker_words(peers, monkeypatch):
    runner = llamacpp.LlamaCppRunner("q4_1", threads=1, extra_tokens=3)
    try:
        with pytest.raises(llamacpp.WorkerError, match="needs a fork with n_seq=2"):
            runner.decode(2, torch.tensor([1, 2]))
        assert runner.prefill(torch.tensor([1, 2, 3])) == [1, 2, 3]  # the worker keeps serving
    finally:
        runner.close()
    monkeypatch.setenv("FAKE_FAIL_ON", "prefill")
    runner = llamacpp.LlamaCppRunner("q4_1", threads=1, extra_tokens=3)
    with pytest.raises(llamacpp.WorkerError, match="(?s)exited with code 3 during 'prefill'.*dying on prefill"):
        runner.prefill(torch.tensor([1]))
    runner.close()


def _proc_state(pid: int, want: str, wait_s: float = 5.0) -> str:
    """The process's state letter, once it is ``want`` (a signal is delivered asynchronously) or after wait_s."""
    for _ in range(int(wait_s / 0.01)):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == want:
            break
        time.sleep(0.01)
    return state


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_is_stopped_between_calls(peers):
    """Its threads take no CPU while the bench measures our rows; it still answers every call."""
    runner = llamacpp.LlamaCppRunner("q4_1", threads=1, extra_tokens=3)
    try:
        pid = runner.worker.proc.pid
        assert _proc_state(pid, "T") == "T"
        assert runner.prefill(torch.tensor([1, 2, 3])) == [1, 2, 3]
        assert _proc_state(pid, "T") == "T"
    finally:
        runner.close()
    assert runner.worker.proc.returncode == 0  # resumed to read "quit", not killed
    unpaused = llamacpp.LlamaCppRunner("q4_1", threads=1, extra_tokens=3, pause=False)
    try:
        assert _proc_state(unpaused.worker.proc.pid, "T", wait_s=0.5) != "T"
        assert unpaused.row_extra["stopped_between_calls"] is False
    finally:
        unpaused.close()


def test_a_worker_that_fails_to_load_is_not_left_stopped(peers, tmp_path, monkeypatch):
    """The caller never gets the runner to close, so the constructor must end the worker itself."""
    started = []
    real = llamacpp.WorkerClient

    def spy(*a, **k):
        started.append(real(*a, **k))
        return started[-1]

    monkeypatch.setattr(llamacpp, "WorkerClient", spy)
    missing = tmp_path / "missing.gguf"  # given with argv, the path reaches the worker unchecked
    with pytest.raises(llamacpp.WorkerError, match="FileNotFoundError"):
        llamacpp.LlamaCppRunner(str(missing), threads=1, extra_tokens=3, argv=[sys.executable, str(FAKE)])
    assert started and started[0].proc.poll() is not None  # exited, not stopped


def test_reports_replace_parent_clocks():
    r = llamacpp.WorkerReports()
    for w in (1.0, 2.0, 3.0):
        r.add({"wall_s": w, "cpu_s": w / 2, "peak_rss_mb": 10 * w, "rise_mb": w})
    r.setup_mb = 4.0
    t = r.timing(2)  # the last two: the first call was warm-up
    assert t.samples == (2.0, 3.0) and t.cpu_samples == (1.0, 1.5)
    assert r.fields() == {"peak_rss_mb": 30.0, "rss_delta_mb": 7.0}
    with pytest.raises(ValueError, match="4 timed calls"):
        r.timing(4)


def parse(argv):
    p = argparse.ArgumentParser()
    decode.add_arguments(p)
    return p.parse_args(argv)


def test_decode_bench_llamacpp_rows(tiny_dir, peers, tmp_path):
    out = tmp_path / "decode.json"
    args = parse(["--json", str(out), "--teacher", str(tiny_dir), "--dtype-list", "float32,bfloat16",
                  "--impl", "ours,llamacpp", "--llamacpp-gguf", "q4_1,bf16", "--llamacpp-threads", "3",
                  "--prefill-lengths", "8", "--contexts", "12", "--batches", "1,2", "--steps", "2"])
    assert decode.run(args) == 0
    doc = json.loads(out.read_text())
    peer = [r for r in doc["results"] if r["impl"] == "llamacpp"]
    assert all(r["stopped_between_calls"] is sys.platform.startswith("linux") for r in peer)
    assert [(r["dtype"], r["group_dtype"], r["batch"], r["context"]) for r in peer] == [
        ("q4_1", "float32", 1, 8), ("q4_1", "float32", 1, 12), ("q4_1", "float32", 2, 12),
        ("bf16", "bfloat16", 1, 8), ("bf16", "bfloat16", 1, 12), ("bf16", "bfloat16", 2, 12)]
    for r in peer:
        assert r["threads"] == 3 and r["gguf"].endswith(f".{r['dtype']}.gguf") and r["dsla_ratio"] == 0.0
        if r["prefill_tokens_per_s"] is not None:  # the fake takes 1e-4 s per prompt token
            assert r["prefill_tokens_per_s"] == pytest.approx(1e4) and r["peak_rss_mb"] == 10.0
        else:  # ... and 1e-3 s per decoded token, so B ms per step
            assert r["decode_ms_per_token"] == pytest.approx(r["batch"]) and r["decode_cpu_ms_per_token"] == 2.0
            assert r["rss_delta_mb"] == 5.5  # setup (fork) + the largest rise in a step
    summary = {(s["dtype"], s["batch"]): s for s in doc["summary"]}
    assert "llamacpp_q4_1_over_ours" in summary[("float32", 2)] and "llamacpp_bf16_ms" in summary[("bfloat16", 1)]
    assert "llamacpp_bf16_ms" not in summary[("float32", 1)]


def test_decode_settings_reject_bad_peer_values():
    with pytest.raises(ValueError, match="q8"):
        decode.DecodeSettings(impls=("llamacpp",), llamacpp_ggufs=("q8",))
    with pytest.raises(ValueError, match="threads 0"):
        decode.DecodeSettings(llamacpp_threads=0)
