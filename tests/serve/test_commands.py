"""`dsla serve` wiring: layer plans from flags, engine construction, CLI registration."""

from __future__ import annotations

import importlib.util

import pytest

from dsla.serve.commands import build_engine, plan_layers


def test_plan_layers():
    assert plan_layers(30, [5, 2, 5], None, None) == [2, 5]
    assert plan_layers(30, None, None, None) == []
    assert plan_layers(10, None, 0.3, [7, 1, 4, 9]) == [1, 4, 7]
    with pytest.raises(ValueError, match="needs --student"):
        plan_layers(10, None, 0.5, None)
    with pytest.raises(ValueError, match="only 2 finished"):
        plan_layers(10, None, 0.5, [3, 4])
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        plan_layers(10, None, 1.5, [3])


@pytest.mark.skipif(importlib.util.find_spec("dsla.ops.dsla") is None, reason="DSLA ops not landed")
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
