"""`dsla serve`: load a teacher (and optionally a student), choose a layer policy, serve it over HTTP.

``--policy static`` keeps the plan of ``--dsla-layers`` / ``--dsla-ratio`` (changed only through
POST /v1/dsla/plan); ``--policy adaptive`` starts there (default: full attention) and lets the
controller (``dsla.serve.policy``) convert layers under load and revert them when it falls.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
from pathlib import Path
from typing import Sequence

from dsla.plan import layers_for_ratio

log = logging.getLogger(__name__)


def plan_layers(num_layers: int, dsla_layers: Sequence[int] | None, dsla_ratio: float | None,
                order: Sequence[int] | None) -> list[int]:
    """The layers to run as DSLA: an explicit list, or the first ``ratio`` of the student's order."""
    if dsla_layers is not None and dsla_ratio is not None:
        raise ValueError("give either --dsla-layers or --dsla-ratio, not both")
    if dsla_ratio is None:
        return sorted(set(dsla_layers or ()))
    if not 0 <= dsla_ratio <= 1:
        raise ValueError(f"--dsla-ratio={dsla_ratio} must be in [0, 1]")
    if order is None:
        raise ValueError("--dsla-ratio needs --student (its manifest gives the conversion order); "
                         "without a student name the layers with --dsla-layers")
    return sorted(layers_for_ratio(order, num_layers, dsla_ratio))


def build_engine(teacher: str | Path, dtype: str = "float32", student: str | Path | None = None,
                 dsla_layers: Sequence[int] | None = None, dsla_ratio: float | None = None,
                 config=None, policy: str = "static", policy_config=None, quality=(), weights: str = "native",
                 dsla_prefill: str = "auto"):
    """Load the model and tokenizer and return a (not yet started) ``Engine``.

    ``weights`` (``--weights``: auto, native, packed, int8, int4, mixed) quantises the linear layers once the
    DSLA modules are attached (``dsla.model.quant``); the preset it resolved to is logged and
    exported in /metrics as ``dsla_model_info{weights=...}``.

    ``policy="adaptive"`` attaches a controller with ``policy_config`` (default ``PolicyConfig()``)
    and the per-ratio ``quality`` curve; it converts the student's finished layers in its order
    (without a student: every layer, untrained, by index). ``dsla_prefill`` (``--dsla-prefill``):
    see ``ModelRunner``; "auto" is "fold" where our bf16 prefill attention kernel runs, else "dsla".
    """
    import torch

    from dsla.model.loading import load_teacher, teacher_hash
    from dsla.config import LlamaConfig
    from dsla.model.quant import load_dtype, quantize_model, resolve_weights
    from dsla.model.tokenizer import Tokenizer
    from dsla.serve.control import Controller
    from dsla.serve.engine import Engine
    from dsla.serve.policy import PolicyConfig
    from dsla.serve.runner import ModelRunner
    from dsla.serve.scheduler import SchedulerConfig

    if policy not in ("static", "adaptive"):
        raise ValueError(f"--policy={policy!r} must be static or adaptive")

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    target = dtypes[dtype]
    preset, reason = resolve_weights(weights, target, LlamaConfig.from_dir(teacher))
    model = load_teacher(teacher, dtype=load_dtype(preset, target))  # float32 until quantised (exact blocks)
    order = None
    if student is not None:
        from dsla.distill.artifact import load_student

        manifest = load_student(model, student, teacher_hash(teacher))
        order = [i for i in manifest["order"] if i in set(manifest["layers_done"])]
    plan = plan_layers(model.cfg.num_hidden_layers, dsla_layers, dsla_ratio, order)
    missing = [i for i in plan if i not in model.dsla_layers()]
    if missing and student is not None:
        raise ValueError(f"layers {missing} are not in the student {student}: distill them or drop them from "
                         "--dsla-layers")
    if missing:
        log.warning("no student: layers %s run untrained DSLA (initialised from the teacher)", missing)
        model.add_dsla(missing)
    controller = None
    if policy == "adaptive":
        if order is None:
            order = list(range(model.cfg.num_hidden_layers))
            log.warning("adaptive policy without --student: it converts untrained DSLA layers in index order "
                        "(output quality will suffer; distill a student with `dsla distill`)")
            model.add_dsla([i for i in order if i not in model.dsla_layers()])
        controller = Controller(policy_config or PolicyConfig(quality_budget=PolicyConfig.quality_budget if quality else None),
                                order, quality)
    quantize_model(model, preset, target)  # after every DSLA module is attached
    log.info("weights: %s (--weights %s: %s)", preset, weights, reason)
    from dsla.model.dsla import warm_up_decode
    from dsla.ops.compiled import compiled_decode_on
    if compiled_decode_on() and model.dsla_layers():
        import time
        t0 = time.perf_counter()
        if warm_up_decode(model):
            log.info("compiled the DSLA decode step before serving in %.1f s (the first time on a machine, about "
                     "a minute on 2 cores; later starts reuse torch's compile cache)", time.perf_counter() - t0)
    from dsla.ops.cpu_kernels import cpu_kernels_lib
    kernels = "on" if cpu_kernels_lib() is not None else "off"  # built now, not under load
    log.info("our CPU kernels (dsla.ops.cpu_kernels): %s", kernels)
    if dsla_prefill == "auto":  # fold where prefill attention is our kernel (it made exact prefill the cheaper)
        lib = cpu_kernels_lib()
        fast = target == torch.bfloat16 and lib is not None and lib.dsla_prefill_attention_available()
        dsla_prefill = "fold" if fast else "dsla"
        if model.dsla_layers():
            log.info("--dsla-prefill auto: %s (%s)", dsla_prefill, "our bf16 prefill attention kernel runs here" if fast
                     else "no bf16 prefill attention kernel here: SDPA")
    runner = ModelRunner(model, plan, dsla_prefill)
    engine = Engine(runner, Tokenizer(teacher), config or SchedulerConfig(), controller=controller, order=order)
    engine.metrics.set_info(dtype=dtype, weights=preset, cpu_kernels=kernels)
    return engine


def read_quality_report(path: str | Path, student: str | Path | None = None):
    """The per-ratio quality curve from a `dsla eval` report.json (or its directory)."""
    from dsla.serve.policy import quality_curve_from_report

    p = Path(path)
    p = p / "report.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"quality report {p} not found: run `dsla eval --student DIR --out REPORT_DIR`")
    return quality_curve_from_report(json.loads(p.read_text()), student=None if student is None else str(student))


def curl_example(host: str, port: int, model: str, api_key: bool) -> str:
    """A ready-to-paste request against the server."""
    body = json.dumps({"model": model, "max_tokens": 80,
                       "messages": [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]})
    auth = ' -H "Authorization: Bearer $DSLA_API_KEY"' if api_key else ""
    return (f"curl http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
            f"-d {shlex.quote(body)}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dsla.cliargs import add_compile_argument, add_dataclass_arguments, add_model_arguments, add_weights_argument
    from dsla.serve.policy import PolicyConfig
    from dsla.serve.scheduler import SchedulerConfig

    d = SchedulerConfig()
    add_model_arguments(p, dtype_default="auto")  # bfloat16 where the CPU has native bf16
    # auto: mixed on a CPU with native bf16 (int4 kernels for decode steps, oneDNN-packed bf16 for
    # prefill chunks): faster than native on every decode and prefill row of docs/results/speed.md;
    # plain int4 had doubled the TTFT through the server (its kernels are slow for prefill's many rows)
    add_weights_argument(p, default="auto")
    add_compile_argument(p)
    p.add_argument("--student", default=None, help="student directory from `dsla distill` (DSLA weights)")
    p.add_argument("--policy", choices=["static", "adaptive"], default="static",
                   help="static: keep the --dsla-layers/--dsla-ratio plan; adaptive: convert layers under load "
                        "(starting from that plan) and revert them when load falls")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dsla-layers", default=None, help="comma-separated layers to run as DSLA")
    g.add_argument("--dsla-ratio", type=float, default=None,
                   help="fraction of layers to run as DSLA, taken in the student's order")
    p.add_argument("--dsla-prefill", choices=["auto", "dsla", "fold"], default="auto",
                   help="how prompts pass the plan's DSLA layers (auto: fold where our bf16 prefill attention "
                        "kernel runs, i.e. bfloat16 on a CPU with AVX-512 BF16, else dsla): dsla (their DSLA "
                        "form) or fold (softmax "
                        "attention, then folded into DSLA state before decoding: faster at a few thousand "
                        "tokens with our attention kernel, and the prompt is read exactly; a request is "
                        "admitted at the memory price of a full KV cache, and its layers are those of the "
                        "plan when its prompt is done)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: teacher dir name)")
    p.add_argument("--api-key", default=os.environ.get("DSLA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $DSLA_API_KEY, else open)")
    p.add_argument("--no-plan-control", action="store_true",
                   help="refuse forced plan changes (POST /v1/dsla/plan answers 403); the live page is read-only")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="requests running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="tokens per engine step (decodes + prefill chunks)")
    p.add_argument("--cache-budget-mb", type=float, default=d.cache_budget_bytes / 2**20,
                   help="cache memory for all running requests, MiB (over it: preempt the newest)")
    p.add_argument("--max-waiting", type=int, default=d.max_waiting,
                   help="queued requests beyond which new ones get 503 + Retry-After")
    p.add_argument("--decode-reserve-tokens", type=int, default=d.decode_reserve_tokens,
                   help="KV room reserved at admission for output tokens, beyond the prompt (the total "
                        "is rounded up to a size class, at most 25%% more, so similar requests share "
                        "one attention call per decode step)")
    p.add_argument("--max-body-kb", type=int, default=1024, help="request bodies over this get 413")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header names to answer ('*': any); default: the --host address "
                        "(loopback: 127.0.0.1, localhost, ::1; 0.0.0.0: any). Others get 400, which stops DNS "
                        "rebinding")
    p.add_argument("--shutdown-timeout-s", type=float, default=30.0,
                   help="on SIGTERM/Ctrl-C: refuse new requests (503) and let running ones finish for this long, "
                        "then end the rest with an error")
    g = p.add_argument_group("adaptive policy (--policy adaptive; see dsla/serve/policy.py for each field)")
    g.add_argument("--quality-report", default=None,
                   help="report.json of `dsla eval` for the student: per-ratio perplexity for --quality-budget")
    add_dataclass_arguments(g, PolicyConfig)


def run(args: argparse.Namespace) -> int:
    from dsla.cliargs import dataclass_from_args, parse_list
    from dsla.paths import resolve_teacher
    from dsla.serve.api import create_app
    from dsla.serve.edge import default_allowed_hosts
    from dsla.serve.dashboard import set_plan_control
    from dsla.serve.policy import PolicyConfig
    from dsla.serve.scheduler import SchedulerConfig

    teacher = resolve_teacher(args.teacher)
    config = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                             cache_budget_bytes=int(args.cache_budget_mb * 2**20), max_waiting=args.max_waiting,
                             decode_reserve_tokens=args.decode_reserve_tokens)
    if args.shutdown_timeout_s < 0:
        raise ValueError(f"--shutdown-timeout-s={args.shutdown_timeout_s} must be >= 0")
    layers = parse_list(args.dsla_layers, int) if args.dsla_layers else None
    hosts = parse_list(args.allowed_hosts) if args.allowed_hosts else default_allowed_hosts(args.host)
    policy_config = dataclass_from_args(PolicyConfig, args)
    report = args.quality_report
    if report is None and args.student is not None and (Path(args.student) / "report.json").is_file():
        report = Path(args.student) / "report.json"  # a shipped student carries its own eval report
    quality = read_quality_report(report, args.student) if report else ()
    if args.policy == "adaptive" and not quality and policy_config.quality_budget == PolicyConfig().quality_budget:
        log.warning("no quality report (--quality-report, or report.json in the student directory): the default "
                    "quality budget of %.0f%% is not enforced", 100 * policy_config.quality_budget)
        policy_config = dataclasses.replace(policy_config, quality_budget=None)
    if quality:
        log.info("quality curve from %s: %s", report, ", ".join(f"{r:.2f}: +{q:.1%}" for r, q in quality))
    from dsla.ops.cpu_kernels import use_cpu_kernels
    use_cpu_kernels(args.cpu_kernels)
    if args.compile_decode:
        from dsla.ops.compiled import use_compiled_decode
        use_compiled_decode(True)
        log.info("DSLA decode steps compiled with torch.compile (compiled at start, before serving)")
    engine = call_in_thread(build_engine, teacher, args.dtype, args.student, layers, args.dsla_ratio, config,
                            args.policy, policy_config, quality, args.weights, args.dsla_prefill)
    name = args.served_model_name or teacher.name
    app = create_app(engine, name, api_key=args.api_key, max_body_bytes=args.max_body_kb * 1024,
                     allowed_hosts=None if hosts is None or "*" in hosts else hosts)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
    set_plan_control(app, not args.no_plan_control)
    engine.start()
    log.info("serving %s (%s, weights %s, policy %s, DSLA layers %s) on http://%s:%d", name, args.dtype,
             engine.runner.model.weights, args.policy, list(engine.runner.plan) or "none", args.host, args.port)
    auth = ' -H "Authorization: Bearer $DSLA_API_KEY"' if args.api_key else ""
    print(f"\ndsla serve: http://{args.host}:{args.port}  (model {name!r}, policy {args.policy}; Ctrl-C stops)\n"
          f"try:\n  {curl_example(args.host, args.port, name, bool(args.api_key))}\n"
          f"  curl http://{args.host}:{args.port}/v1/dsla/plan{auth}\n"
          f"live page: http://{args.host}:{args.port}/dashboard\n", flush=True)
    try:
        graceful_server(app, engine, args.host, args.port, args.shutdown_timeout_s).run()
    finally:
        engine.shutdown()
    return 0


def call_in_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh thread that then exits: its result, or its exception.

    Why the model is loaded this way: the engine steps the model in its own thread, and torch's
    CPU ops run their parallel parts on OpenMP (libgomp) teams, one per thread that starts them,
    alive as long as that thread. Loading the model in the main thread left the main thread's
    team alive beside the engine's; with more OpenMP threads than cores, libgomp lets idle workers
    sleep at once instead of spinning, and every parallel op of a step then waits for a wake-up.
    Engine steps in a thread were 1.2-1.4x slower than in the main thread (teacher, 48 decodes,
    2 cores; silu on 48 x 1536: 38 against 14 us). A loading thread that exits takes its team with
    it. Nothing in the main thread (uvicorn) runs torch ops after this."""
    import threading

    out: dict = {}

    def target() -> None:
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the caller's thread
            out["error"] = e

    # a daemon: Ctrl-C during the load ends the process on every Python version
    t = threading.Thread(target=target, name=f"dsla-{getattr(fn, '__name__', 'call')}", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def graceful_server(app, engine, host: str, port: int, shutdown_timeout_s: float):
    """A uvicorn server that, on SIGTERM or Ctrl-C, shuts down gracefully: the engine stops admitting
    (new requests get 503), running requests get ``shutdown_timeout_s`` to finish, the rest end
    with an error (a stream gets an error event, then [DONE]), and only then does uvicorn close
    its connections. A second signal exits at once."""
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        draining = False

        def handle_exit(self, sig, frame) -> None:
            if self.draining:  # a second signal: uvicorn's own (forced) exit
                return super().handle_exit(sig, frame)
            self.draining = True
            log.info("signal %s: draining for up to %.0f s (new requests get 503)", sig, shutdown_timeout_s)
            threading.Thread(target=self.drain, name="dsla-drain", daemon=True).start()

        def drain(self) -> None:
            failed = engine.drain(shutdown_timeout_s)
            if failed:
                log.warning("shutdown: %d requests did not finish in %.0f s and were ended with an error",
                            failed, shutdown_timeout_s)
            self.should_exit = True

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    return Server(config)
