"""`dsla serve` wiring: layer plans from flags, engine construction, CLI registration."""

from __future__ import annotations


import shutil

import pytest

from dsla.serve.commands import build_engine, plan_layers


def test_plan_layers():
    assert plan_layers(30, [5, 2, 5], None, None) == [2, 5]
    assert plan_layers(30, None, None, None) == []
    assert plan_layers(10, None, 0.3, [7, 1, 4, 9]) == [1, 4, 7]
    with pytest.raises(ValueError, match="needs --student"):
        plan_layers(10, None, 0.5, None)
    with pytest.raises(ValueError, match="only 2 layers"):
        plan_layers(10, None, 0.5, [3, 4])
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        plan_layers(10, None, 1.5, [3])


def test_build_engine_with_untrained_dsla_layers(serve_dir):
    from dsla.serve.scheduler import SchedulerConfig

    engine = build_engine(serve_dir, dsla_layers=[2], config=SchedulerConfig(max_num_seqs=4))
    assert engine.runner.plan == (2,)
    cost = engine.scheduler.cost
    assert cost.fixed_bytes > 0 and cost.kv_bytes_per_token == 2 * 2 * 8 * 4 * 2  # K+V, 2 heads, dim 8, fp32, 2 layers
    assert engine.config.max_num_seqs == 4


def test_cli_registers_serve():
    from dsla.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "9", "--dsla-layers", "1,2", "--cache-budget-mb", "64"])
    assert args.port == 9 and args.host == "127.0.0.1" and args.dsla_layers == "1,2"
    args = build_parser().parse_args(["bench", "serve", "--rate", "2", "--num-requests", "5"])
    assert args.rate == 2 and args.num_requests == 5


def test_build_engine_adaptive_without_student_uses_every_layer(serve_dir):
    from dsla.serve.policy import PolicyConfig

    engine = build_engine(serve_dir, policy="adaptive", policy_config=PolicyConfig(max_ratio=0.5, quality_budget=None))
    assert engine.controller is not None and engine.controller.order == (0, 1, 2)
    assert engine.order == (0, 1, 2) and engine.runner.plan == ()
    assert engine.plan_view()["controller"]["config"]["max_ratio"] == 0.5
    with pytest.raises(ValueError, match="quality-report"):
        build_engine(serve_dir, policy="adaptive", policy_config=PolicyConfig(quality_budget=0.1))
    with pytest.raises(ValueError, match="static or adaptive"):
        build_engine(serve_dir, policy="fast")


def test_cli_policy_flags_and_curl_example():
    import shlex

    from dsla.cli import build_parser
    from dsla.cliargs import dataclass_from_args
    from dsla.serve.commands import curl_example
    from dsla.serve.policy import PolicyConfig

    args = build_parser().parse_args(["serve", "--policy", "adaptive", "--ttft-target-s", "2.5", "--max-ratio", "0.5",
                                      "--quality-budget", "none", "--cooldown-s", "1"])
    cfg = dataclass_from_args(PolicyConfig, args)
    assert args.policy == "adaptive" and cfg.ttft_target_s == 2.5 and cfg.max_ratio == 0.5
    assert cfg.quality_budget is None and cfg.cooldown_s == 1 and cfg.calm_s == PolicyConfig().calm_s
    assert build_parser().parse_args(["serve"]).policy == "static"
    cmd = shlex.split(curl_example("127.0.0.1", 8000, "m", api_key=True))
    assert cmd[:2] == ["curl", "http://127.0.0.1:8000/v1/chat/completions"]
    assert "Authorization: Bearer $DSLA_API_KEY" in cmd and '"model": "m"' in cmd[-1]


def test_help_carries_the_config_field_docs(capsys):
    from dsla.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "recent median time to first token above this is overload" in out  # PolicyConfig.ttft_target_s
    assert "--shutdown-timeout-s" in out and "--allowed-hosts" in out


def test_build_engine_quantised_weights_are_reported(serve_dir):
    from dsla.cli import build_parser
    from dsla.model.quant import Int8Linear

    engine = build_engine(serve_dir, dtype="bfloat16", dsla_layers=[2], weights="int8")
    model = engine.runner.model
    assert model.weights == "int8" and isinstance(model.dsla["2"].q_proj, Int8Linear)
    kernels = "on" if shutil.which("g++") or shutil.which("c++") else "off"  # dsla.ops.cpu_kernels
    assert engine.metrics.snapshot()["model_info"] == {"dtype": "bfloat16", "weights": "int8", "cpu_kernels": kernels}
    assert f'dsla_model_info{{cpu_kernels="{kernels}",dtype="bfloat16",weights="int8"}} 1' in engine.metrics.render()
    # auto keeps float32 native (the quantised kernels are slow with float32 activations)
    assert build_engine(serve_dir, weights="auto").metrics.snapshot()["model_info"]["weights"] == "native"
    with pytest.raises(ValueError, match="needs --dtype bfloat16"):
        build_engine(serve_dir, weights="int4")
    assert build_parser().parse_args(["serve", "--weights", "int4"]).weights == "int4"
    assert build_parser().parse_args(["generate", "hi"]).weights == "auto"
    assert build_parser().parse_args(["serve"]).weights == "auto"  # mixed on a bf16 CPU (docs/results/speed.md)


@pytest.mark.parametrize("flags,want", [(frozenset({"avx512f", "avx512_bf16"}), "bfloat16"),
                                        (frozenset({"avx2"}), "float32")])
def test_dtype_auto_resolves_at_parse_time(monkeypatch, flags, want):
    from dsla.cli import build_parser
    from dsla.model import quant

    monkeypatch.setattr(quant, "cpu_flags", lambda: flags)
    assert build_parser().parse_args(["serve"]).dtype == want  # serve defaults to auto
    assert build_parser().parse_args(["serve", "--dtype", "auto"]).dtype == want
    assert build_parser().parse_args(["serve", "--dtype", "float32"]).dtype == "float32"
    assert build_parser().parse_args(["eval"]).dtype == "float32"  # the others keep float32 by default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--dtype", "float16"])


def test_call_in_thread_returns_the_value_from_another_thread_and_reraises():
    """``dsla serve`` loads the model through it, so the loading thread's OpenMP team exits with it."""
    import threading

    from dsla.serve.commands import call_in_thread

    main = threading.get_ident()
    value, ident = call_in_thread(lambda a, b=0: (a + b, threading.get_ident()), 2, b=3)
    assert value == 5 and ident != main

    def boom():
        raise ValueError("--teacher 'x' is not a prepared teacher: run `dsla prepare`")

    with pytest.raises(ValueError, match="not a prepared teacher"):
        call_in_thread(boom)
