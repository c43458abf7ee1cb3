"""The serving engine: one background thread owns the scheduler, the runner and every request.

Other threads talk to it only through a thread-safe inbox (``submit``, ``abort``,
``run_between_steps``); results go out through each request's sink, a callable the engine calls
from its thread with a ``RequestOutput`` delta (the HTTP layer's sink hops onto its event loop).
Aborts and plan changes take effect between steps, never inside one.

Layer plans: converting a layer to DSLA applies to every request, in flight included (its KV
for that layer is folded into DSLA state and freed at once); reverting a layer to attention
applies to requests admitted from then on (in-flight ones keep DSLA there: their KV is gone).
An optional ``Controller`` (the adaptive policy) decides such changes between steps; anyone can
force one through ``run_between_steps(lambda e: e.set_plan(...))``.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Sequence

from dsla.model.tokenizer import Tokenizer
from dsla.plan import layers_for_ratio
from dsla.sampling import SamplingParams, stop_token_ids
from dsla.serve.control import Controller, LatencyWindow
from dsla.serve.detokenize import Detokenizer
from dsla.serve.live import Timeline, live_view
from dsla.serve.metrics import Metrics
from dsla.serve.outputs import Collector, RequestOutput, Sink  # noqa: F401  (re-exported)
from dsla.serve.policy import LoadSnapshot
from dsla.serve.request import FinishReason, Request, RequestStatus
from dsla.serve.runner import ModelRunner
from dsla.serve.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.5  # how long an idle engine blocks on its inbox before checking for shutdown
FAULT_BACKOFF_S = 0.1  # pause after an engine fault that failed no request (it may recur at once)
PLAN_HISTORY = 256  # plan changes kept for /v1/dsla/plan
LATENCY_WINDOW_S = 30.0  # recent TTFT/TPOT window without a controller


class EngineOverloaded(RuntimeError):
    """The queue is full, or the engine stopped admitting: the caller should retry later (HTTP 503)."""



class _Tracked:
    """Engine-side companions of a request: where its outputs go and what was sent already."""

    def __init__(self, req: Request, sink: Sink, detok: Detokenizer | None) -> None:
        self.req, self.sink, self.detok = req, sink, detok
        self.sent_tokens = 0
        self.sent_prompt_logprobs = False


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, config: SchedulerConfig = SchedulerConfig(),
                 extra_eos_ids: Sequence[int] = (), controller: Controller | None = None,
                 order: Sequence[int] | None = None) -> None:
        """``order``: the layers a conversion ratio takes, first to last (the student's finished
        layers in its order; default: every layer with a DSLA module, by index)."""
        self.runner, self.tokenizer, self.config, self.controller = runner, tokenizer, config, controller
        self.order = tuple(runner.model.dsla_layers() if order is None else order)
        rank = {layer: n for n, layer in enumerate(self.order)}
        self.converted_order = tuple(sorted(runner.plan, key=lambda i: (rank.get(i, len(rank)), i)))
        self.last_plan_change: float | None = None
        self.plan_history: deque[dict[str, Any]] = deque(maxlen=PLAN_HISTORY)
        window = controller.config.latency_window_s if controller else LATENCY_WINDOW_S
        self.recent_ttft, self.recent_tpot = LatencyWindow(window), LatencyWindow(window)
        self.scheduler = Scheduler(config, runner.cache_cost(runner.admission_layers()))
        self.eos_token_ids = stop_token_ids(runner.model.cfg.eos_token_id, tokenizer, extra_eos_ids)
        self.metrics = Metrics()
        self.metrics.set(cache_budget_bytes=config.cache_budget_bytes, num_layers=self.num_layers)
        self._plan_metrics()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox_adds = 0  # submissions not yet moved into the scheduler
        self._lock = threading.Lock()
        self._tracked: dict[str, _Tracked] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.admitting = True  # False once a shutdown began: submit() refuses new requests
        self._in_step: tuple[str, ...] | None = None  # ids of the requests the current step scheduled
        self._scheduling = False  # inside scheduler.schedule(): a fault there leaves its state unknown
        self.error: BaseException | None = None  # set if the loop itself died
        self.timeline = Timeline()  # one sample a second of load, plan and memory (the live page)
        self.last_load: LoadSnapshot | None = None  # the load of the latest timeline sample
        self._period_steps, self._period_step_s = 0, 0.0  # engine steps since that sample, their time

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.runner.model.cfg.vocab_size

    @property
    def num_layers(self) -> int:
        return self.runner.model.cfg.num_hidden_layers

    # ---- called from any thread ----------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="dsla-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def num_queued(self) -> int:
        return self.scheduler.num_waiting + self._inbox_adds

    def submit(self, prompt_ids: Sequence[int], options: SamplingParams, sink: Sink,
               request_id: str | None = None) -> str:
        """Queue a request; return its id. Raises ValueError (bad request) or EngineOverloaded."""
        prompt_ids = [int(t) for t in prompt_ids]
        vocab = self.runner.model.cfg.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        total = len(prompt_ids) + options.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({options.max_tokens}) is "
                             f"{total} tokens, more than the model's context of {self.max_model_len}")
        req = Request(request_id or uuid.uuid4().hex, prompt_ids, options, self.eos_token_ids)
        self.scheduler.check_fits(req)
        with self._lock:
            if not self.admitting:
                raise EngineOverloaded("the server is shutting down: retry against another instance or later")
            if self.num_queued() >= self.config.max_waiting:
                self.metrics.inc("requests_rejected_total")
                raise EngineOverloaded(f"{self.num_queued()} requests are already queued (limit "
                                       f"{self.config.max_waiting}): retry later")
            self._inbox_adds += 1
        self._inbox.put(("add", req, sink))
        return req.request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request; its cache is freed at the next step. Unknown ids are ignored."""
        self._inbox.put(("abort", request_id))

    def run_between_steps(self, fn: Callable[["Engine"], object]) -> Future:
        """Run ``fn(engine)`` on the engine thread between two steps (plan changes go here)."""
        fut: Future = Future()
        self._inbox.put(("call", fn, fut))
        return fut

    # ---- the engine thread ----------------------------------------------------------------------
    @property
    def num_requests(self) -> int:
        """Requests submitted and not yet finished (queued, waiting or running)."""
        with self._lock:
            return len(self._tracked) + self._inbox_adds

    def drain(self, timeout_s: float, message: str = "the server is shutting down") -> int:
        """Stop admitting, let in-flight requests finish for up to ``timeout_s``, then fail the rest
        with ``message`` (their clients get an error, never a silent end). Returns how many were failed."""
        with self._lock:
            self.admitting = False
        deadline = time.monotonic() + timeout_s
        while self.num_requests and time.monotonic() < deadline and self.is_alive:
            time.sleep(0.05)
        if not self.num_requests or not self.is_alive:
            return 0
        fut = self.run_between_steps(lambda e: e._fail(list(e._tracked), message))
        return fut.result(timeout=30)

    def _loop(self) -> None:
        busy = False
        try:
            while not self._stop.is_set():
                try:
                    busy = self._iterate(busy)
                except Exception as e:  # a bug outside the model's forward: fail who it touched, serve on
                    self._fault(e)
        except BaseException as e:  # the thread is going down: fail everyone rather than hang them
            log.exception("engine loop died")
            self.error = e
            self._fail(list(self._tracked), f"engine failure: {e}")

    def _iterate(self, busy: bool) -> bool:
        """One turn of the loop: take messages, let the policy act, run a step. Returns ``busy``."""
        self._drain(block=not self.scheduler.has_work)
        now = time.monotonic()
        self._load_metrics(now)
        if self.controller is not None:
            try:
                self.controller.tick(self, now)
            except Exception:  # a policy bug must not stop serving: keep the plan as it is
                log.exception("the layer policy failed; plan unchanged")
        if self.scheduler.has_work:
            self.step()
            return True
        if busy:  # the load just ended: hand the freed cache memory back to the OS
            release_free_memory()
        return False

    def _fault(self, e: Exception) -> None:
        """An exception escaped a step or the loop: fail the requests it touched (the step's; every
        request when the scheduler itself failed; none outside a step), count the fault, carry on."""
        log.exception("engine fault; failing the affected requests and serving on")
        self.metrics.inc("engine_faults_total")
        victims = list(self._tracked) if self._scheduling else list(self._in_step or ())
        self._in_step, self._scheduling = None, False
        self._fail(victims, f"engine fault: {type(e).__name__}: {e}")
        if not victims:  # nothing was failed, so the same fault may come straight back: do not spin
            self._stop.wait(FAULT_BACKOFF_S)

    def _fail(self, request_ids: Sequence[str], message: str) -> int:
        """Finish these requests with an error; never raises (a broken state is cleaned up by hand)."""
        n = 0
        for rid in request_ids:
            t = self._tracked.get(rid)
            if t is None:
                continue
            n += 1
            try:
                self._finish(t, FinishReason.ERROR, error=message)
            except Exception:
                log.exception("finishing request %s failed; dropping it", rid)
                self._drop(t, message)
        return n

    def _drop(self, t: _Tracked, message: str) -> None:
        """Forget a request without the scheduler (whose state may be what broke) and tell its client."""
        req = t.req
        self._tracked.pop(req.request_id, None)
        self.runner.release(req.request_id)
        for queue_ in (self.scheduler.waiting, self.scheduler.running):
            if req in queue_:
                queue_.remove(req)
        req.status, req.finish_reason = RequestStatus.FINISHED, FinishReason.ERROR
        self._emit(t, "", finished=True, error=message)

    def _drain(self, block: bool) -> None:
        try:
            msg = self._inbox.get(timeout=IDLE_POLL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                self._handle(msg)
            except Exception as e:  # one message's fault fails its own request, not the loop
                self._message_fault(msg, e)
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _message_fault(self, msg: tuple, e: Exception) -> None:
        log.exception("engine fault handling a %r message", msg[0])
        self.metrics.inc("engine_faults_total")
        if msg[0] == "add":  # the request may be half registered: drop it by hand and tell its client
            _, req, sink = msg
            t = self._tracked.setdefault(req.request_id, _Tracked(req, sink, None))
            self._drop(t, f"engine fault: {type(e).__name__}: {e}")
        elif msg[0] == "abort":
            self._fail([msg[1]], f"engine fault: {type(e).__name__}: {e}")

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            _, req, sink = msg
            with self._lock:
                self._inbox_adds -= 1
            t = self._tracked[req.request_id] = _Tracked(req, sink, Detokenizer(
                self.tokenizer, req.prompt_token_ids, req.options.stop))
            try:
                self.scheduler.add(req)
            except ValueError as e:  # the plan changed since submit() checked: it no longer fits
                self._finish(t, FinishReason.ERROR, error=str(e))
        elif kind == "abort":
            t = self._tracked.get(msg[1])
            if t is not None:
                self._finish(t, FinishReason.ABORT)
        elif kind == "call":
            _, fn, fut = msg
            if not fut.set_running_or_notify_cancel():  # the caller gave up waiting
                return
            try:
                fut.set_result(fn(self))
            except Exception as e:  # the caller gets the error through the future
                fut.set_exception(e)

    def step(self) -> None:
        """Schedule, run one forward, sample, emit. Public so tests can step without the thread."""
        t0 = time.perf_counter()
        self._scheduling = True
        out = self.scheduler.schedule()
        self._scheduling = False
        self._in_step = tuple(c.request.request_id for c in out.chunks)
        self.runner.free(out.freed)
        if out.preempted:
            self.metrics.inc("preemptions_total", len(out.preempted))
        if out.chunks:
            try:
                results = self.runner.execute(out)
            except Exception as e:  # e.g. a non-finite DSLA state: fail this step's requests, keep serving
                log.exception("step failed for %d requests", len(out.chunks))
                self.metrics.inc("step_errors_total")
                self._fail(self._in_step, str(e))
                results = None
            if results is not None:
                sampled = [c.request for c in out.chunks if c.samples]  # before the new tokens change that
                self.scheduler.advance(out)
                now = time.monotonic()
                for c in out.chunks:
                    self._process_one(c.request.request_id, c.completes, results[c.request.request_id], now)
                if self.runner.dsla_prefill == "fold" and self.runner.plan:
                    self._fold_prefilled(sampled)
            self.metrics.inc("steps_total")
        self._in_step = None
        self.metrics.set(requests_running=self.scheduler.num_running, requests_waiting=self.scheduler.num_waiting,
                         cache_bytes_used=self.runner.cache_bytes())
        took = time.perf_counter() - t0
        self.metrics.observe("step_seconds", took)
        self._period_steps, self._period_step_s = self._period_steps + 1, self._period_step_s + took

    def _fold_prefilled(self, sampled: Sequence[Request]) -> None:
        """``--dsla-prefill fold``: of the requests this step sampled a token for, those that still
        run and hold KV in layers of the plan (their prompt just done, the token handed out) fold
        them into DSLA state now, and are priced as such. A failed fold (a non-finite state) fails
        that request."""
        for req in sampled:
            rid = req.request_id
            if rid not in self.runner.caches or req.status is not RequestStatus.RUNNING:
                continue
            if set(self.runner.plan) <= set(self.runner.dsla_layers_of(rid)):
                continue
            err = self.runner.fold_to_plan(rid)
            self.scheduler.reprice(req, self.runner.cache_cost(self.runner.dsla_layers_of(rid)))
            if err is not None:
                self._fail([rid], f"folding the prompt into DSLA state failed: {err}")
            else:
                self.metrics.inc("prefill_folds_total")

    def _process_one(self, request_id: str, completes: bool, res, now: float) -> None:
        """Hand one request its step result; a failure here (sampling, stop handling, detokenising)
        finishes that request with an error and leaves the rest of the step alone."""
        t = self._tracked.get(request_id)
        if t is None:
            return
        try:
            if res.error is not None:
                raise RuntimeError(res.error)
            self._process(t, completes, res, now)
        except Exception as e:
            log.warning("request %s failed: %s", request_id, e)
            self.metrics.inc("request_errors_total")
            self._fail([request_id], str(e) if res.error is not None else f"{type(e).__name__}: {e}")

    def _process(self, t: _Tracked, completes: bool, res, now: float) -> None:
        req = t.req
        if req.admitted_time is None:
            req.admitted_time = now
            self.metrics.observe("queue_time_seconds", now - req.arrival_time)
        req.prompt_logprobs += res.prompt_logprobs
        text, reason = "", None
        if res.token_id is not None:
            tok, o = res.token_id, req.options
            if req.first_token_time is None:
                req.first_token_time = now
                self.metrics.observe("time_to_first_token_seconds", now - req.arrival_time)
                self.recent_ttft.add(now, now - req.arrival_time)
            if (tok in req.eos_token_ids and not o.ignore_eos) or tok in o.stop_token_ids:
                reason = FinishReason.STOP  # the stop token itself is not part of the output...
                if res.logprob is not None:  # ...but its logprob is (OpenAI's echo: prompt + 1 entries)
                    req.output_logprobs.append(res.logprob)
            else:
                req.output_token_ids.append(tok)
                if res.logprob is not None:
                    req.output_logprobs.append(res.logprob)
                self.metrics.inc("generation_tokens_total")
                self.metrics.inc_labelled("generation_tokens_by_dsla_layers_total",
                                          len(self.runner.dsla_layers_of(req.request_id)))
                text = t.detok.push(tok)
                if t.detok.stopped:
                    reason = FinishReason.STOP
                elif req.num_output_tokens >= o.max_tokens or req.num_tokens >= self.max_model_len:
                    reason = FinishReason.LENGTH
        elif completes and req.num_output_tokens >= req.options.max_tokens:  # prompt scoring only
            req.first_token_time = req.first_token_time or now
            reason = FinishReason.LENGTH
        if reason is not None:
            self._finish(t, reason, text=text)
        elif text or req.num_output_tokens > t.sent_tokens:
            self._emit(t, text, finished=False)

    def _emit(self, t: _Tracked, text: str, finished: bool, error: str | None = None) -> None:
        req = t.req
        new = slice(t.sent_tokens, req.num_output_tokens)
        prompt_lp = None
        if req.options.prompt_logprobs and not t.sent_prompt_logprobs and (finished or req.num_output_tokens):
            prompt_lp, t.sent_prompt_logprobs = tuple(req.prompt_logprobs), True
        logprobs = tuple(req.output_logprobs[t.sent_tokens:])  # may end with the stop token's
        out = RequestOutput(req.request_id, text, tuple(req.output_token_ids[new]), logprobs,
                            prompt_lp, finished, req.finish_reason if finished else None,
                            req.num_prompt_tokens, req.num_output_tokens, error)
        t.sent_tokens = req.num_output_tokens
        try:
            t.sink(out)
        except Exception:  # a broken sink must not take the engine down; the client is gone
            log.exception("output sink of request %s failed; aborting it", req.request_id)
            if not finished:
                self.abort(req.request_id)

    def _finish(self, t: _Tracked, reason: FinishReason, text: str = "", error: str | None = None) -> None:
        req = t.req
        if req.is_finished:
            return
        self.scheduler.finish(req, reason)
        self.runner.release(req.request_id)
        self._tracked.pop(req.request_id, None)
        now = req.finish_time = time.monotonic()
        m = self.metrics
        m.request_finished(reason.value)
        if reason in (FinishReason.STOP, FinishReason.LENGTH):
            m.inc("prompt_tokens_total", req.num_prompt_tokens)
            m.observe("e2e_request_latency_seconds", now - req.arrival_time)
            if req.first_token_time is not None and req.num_output_tokens > 1:
                tpot = (now - req.first_token_time) / (req.num_output_tokens - 1)
                m.observe("time_per_output_token_seconds", tpot)
                self.recent_tpot.add(now, tpot)
        if reason is not FinishReason.ABORT:
            self._emit(t, text + t.detok.flush(), finished=True, error=error)

    # ---- layer plans (engine thread, between steps) ----------------------------------------------
    def set_plan(self, layers: Sequence[int], reason: str, source: str = "api") -> dict[str, Any]:
        """Make ``layers`` the DSLA layers; return the change as recorded in ``plan_history``.

        Runs on the engine thread between steps (``run_between_steps``, or the controller).
        Layers new to the plan are converted in every live cache (KV folded into DSLA state and
        freed; a request whose fold fails is failed alone) and the caches re-priced; layers
        leaving the plan run attention for requests admitted from now on. All or nothing: when
        anything raises part-way, the plan, every cache, the prices, ``converted_order`` and the
        metrics are put back as they were and the error is raised (ValueError when a layer is out
        of range or has no DSLA module).
        """
        if self._thread is not None and self._thread.is_alive() and threading.current_thread() is not self._thread:
            raise RuntimeError("set_plan runs on the engine thread only: use run_between_steps")
        layers = list(dict.fromkeys(int(i) for i in layers))
        saved = self._save_plan()
        try:
            convert, revert, freed, folded, failed = self._apply_plan(layers)
        except BaseException:
            self._restore_plan(saved)
            raise
        for rid, (i, err) in failed.items():  # committed: now fail the requests whose fold failed
            log.error("folding layer %d of request %s failed: %s", i, rid, err)
            self._fail([rid], f"converting layer {i} failed: {err}")
        self.last_plan_change = time.monotonic()
        ratio = len(layers) / self.num_layers
        event = {"time": time.time(), "source": source, "reason": reason, "converted": convert, "reverted": revert,
                 "dsla_layers": sorted(layers), "ratio": ratio, "in_flight_folded": len(folded),
                 "freed_bytes": freed}
        if convert or revert:
            with self._lock:
                self.plan_history.append(event)
            self.metrics.inc("layer_conversions_total", len(convert))
            self.metrics.inc("layer_reverts_total", len(revert))
            self.metrics.inc("conversion_freed_bytes_total", freed)
            self._plan_metrics()
            log.info("%s: convert %s, revert %s -> %d/%d DSLA layers (ratio %.2f); folded %d in-flight caches, "
                     "freed %.1f MB; %s", source, convert, revert, len(layers), self.num_layers, ratio,
                     len(folded), freed / 2**20, reason)
        return event

    def _apply_plan(self, layers: list[int]):
        """The mutating part of ``set_plan`` (undone by ``_restore_plan`` if it raises)."""
        old, new = set(self.runner.plan), set(layers)
        self.runner.set_plan(layers)
        convert = [i for i in layers if i not in old]
        revert = [i for i in self.converted_order if i not in new]
        freed, folded, failed = 0, set(), {}
        # --dsla-prefill fold: a request still reading its prompt keeps attention everywhere; its
        # layers are folded to the plan of the moment its prompt is done (``_fold_prefilled``)
        reading = {r.request_id for r in self.scheduler.running if r.num_tokens - r.num_computed_tokens > 1} \
            if self.runner.dsla_prefill == "fold" else set()
        for i in convert:
            per_request, errors = self.runner.convert(i, skip=reading)
            freed += sum(per_request.values())
            folded |= set(per_request)
            for rid, err in errors.items():
                failed.setdefault(rid, (i, err))
        for req in self.scheduler.running if convert else ():
            if req.request_id in self.runner.caches:
                self.scheduler.reprice(req, self.runner.cache_cost(self.runner.dsla_layers_of(req.request_id)))
        self.scheduler.set_cost(self.runner.cache_cost(self.runner.admission_layers()))
        self.converted_order = tuple(i for i in self.converted_order if i in new) + tuple(convert)
        return convert, revert, freed, folded, failed

    def _save_plan(self) -> tuple:
        """What ``_apply_plan`` may change: the plan, each cache's per-layer states, the prices."""
        return (self.runner.plan, {rid: list(c.layers) for rid, c in self.runner.caches.items()},
                self.scheduler.cost, {r.request_id: r.cache_cost for r in self.scheduler.running},
                self.converted_order)

    def _restore_plan(self, saved: tuple) -> None:
        # Folding replaces a layer's state object and leaves the old KVState intact, so putting
        # the old objects back undoes it exactly.
        plan, states, cost, prices, order = saved
        self.runner.plan = plan
        for rid, layer_states in states.items():
            if rid in self.runner.caches:
                self.runner.caches[rid].layers[:] = layer_states
        self.scheduler.cost = cost
        for req in self.scheduler.running:
            if req.request_id in prices:
                req.cache_cost = prices[req.request_id]
        self.converted_order = order
        log.warning("the plan change failed; the previous plan %s stays", list(plan))

    def layers_for_ratio(self, ratio: float) -> list[int]:
        """The first round(ratio * layers) layers of the order; ValueError when there are too few."""
        return layers_for_ratio(self.order, self.num_layers, ratio)

    def _queue(self, now: float) -> tuple[int, float]:
        """Prompt tokens not yet computed (waiting + unfinished prefills), oldest wait in seconds."""
        s = self.scheduler
        queued = sum(r.num_tokens for r in s.waiting) + sum(
            n for r in s.running if (n := r.num_tokens - r.num_computed_tokens) > 1)
        return queued, max((now - r.arrival_time for r in s.waiting), default=0.0)

    def load(self, now: float) -> LoadSnapshot:
        """The load the policy sees (engine thread)."""
        s = self.scheduler
        queued, oldest = self._queue(now)
        return LoadSnapshot(queued, s.num_waiting, oldest, s.cache_bytes(), self.config.cache_budget_bytes,
                            self.recent_ttft.median(now), self.recent_tpot.median(now))

    def _load_metrics(self, now: float) -> None:
        """Every loop turn: the load gauges; once a second, a timeline sample too."""
        queued, oldest = self._queue(now)
        self.metrics.set(queued_prompt_tokens=queued, oldest_wait_seconds=oldest)
        if self.timeline.due(now):
            self._sample(now)

    def _sample(self, now: float) -> None:
        """Add a timeline sample (engine thread): load, plan, memory, tokens/s and step time since the last."""
        load = self.last_load = self.load(now)
        kv, state = self.runner.cache_bytes_by_kind()
        snap, prev, wall = self.metrics.snapshot(), self.timeline.last(), time.time()
        tokens = snap["generation_tokens_total"]
        rate = (tokens - prev["generation_tokens"]) / (wall - prev["time"]) if prev and wall > prev["time"] else 0.0
        steps, step_s = self._period_steps, self._period_step_s
        self._period_steps, self._period_step_s = 0, 0.0
        self.timeline.add(now, {
            "time": wall, "ratio": len(self.runner.plan) / self.num_layers, "dsla_layers": len(self.runner.plan),
            "running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting,
            "queued_prompt_tokens": load.queued_prompt_tokens, "oldest_wait_s": load.oldest_wait_s,
            "generation_tokens": tokens, "tokens_per_s": rate, "steps": steps,
            "step_s": step_s / steps if steps else None, "cache_bytes": load.cache_bytes,
            "kv_bytes": kv, "dsla_state_bytes": state, "ttft_s": load.ttft_s, "tpot_s": load.tpot_s})

    def _plan_metrics(self) -> None:
        plan = set(self.runner.plan)
        self.metrics.set(dsla_layers=len(plan))
        for i in range(self.num_layers):
            self.metrics.set_labelled("layer_is_dsla", i, int(i in plan))

    def plan_view(self) -> dict[str, Any]:
        """Plan, order, policy, load and recent changes, for /v1/dsla/plan (safe from any thread); with
        the live page's signals, next candidate, quality and memory (``dsla.serve.live.live_view``)."""
        plan, conv = self.runner.plan, self.converted_order
        with self._lock:
            history = list(self.plan_history)
        snap = self.metrics.snapshot()
        load = {k: snap[k] for k in ("requests_running", "requests_waiting", "queued_prompt_tokens",
                                     "oldest_wait_seconds", "cache_bytes_used", "cache_budget_bytes")}
        return {"object": "dsla.plan", "policy": self.controller.name if self.controller else "static",
                "num_layers": self.num_layers, "dsla_layers": list(plan), "converted_order": list(conv),
                "ratio": len(plan) / self.num_layers, "order": list(self.order),
                "controller": self.controller.describe() if self.controller else None, "load": load,
                "generation_tokens_by_dsla_layers": snap["generation_tokens_by_dsla_layers_total"],
                "layer_conversions_total": snap["layer_conversions_total"],
                "layer_reverts_total": snap["layer_reverts_total"], "history": history, "time": time.time(),
                **live_view(self, conv, history)}


def release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Caches are freed tensor by tensor; glibc keeps those pages in its arenas (the engine thread
    has its own), so without this the resident size stays at the peak of the last burst.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
