"""Model runner: one scheduled step -> one flattened forward of the hybrid model -> sampled tokens.

Owns the per-request caches (``RequestCache``, typed per layer) and the per-request seeded
generators. The layer plan (which layers run DSLA for a new request) lives here; changing it is
done by the engine between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import Tensor

from dsla.model.llama import HybridLM
from dsla.model.state import RequestCache
from dsla.sampling import sample
from dsla.serve.request import Request, TokenLogprob
from dsla.serve.cost import CacheCost
from dsla.serve.scheduler import SchedulerOutput


@dataclass
class StepResult:
    """What one step produced for one request."""

    token_id: int | None = None  # the sampled token, when the step completed the request's tokens
    logprob: TokenLogprob | None = None  # its logprob, when the request asked for logprobs
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # newly scored prompt tokens
    error: str | None = None  # this request's sampling failed (the others in the step are unaffected)


def token_logprobs(lp: Tensor, chosen: Sequence[int], k: int) -> list[TokenLogprob]:
    """lp: (M, vocab) log-probabilities; chosen: M token ids -> one TokenLogprob per row."""
    picked = lp.gather(1, torch.tensor(chosen, device=lp.device)[:, None])[:, 0].tolist()  # (M,)
    if k:
        top_v, top_i = lp.topk(min(k, lp.shape[1]), dim=1)  # (M, k)
        tops = [tuple(zip(i, v)) for i, v in zip(top_i.tolist(), top_v.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(t, p, top) for t, p, top in zip(chosen, picked, tops)]


DSLA_PREFILL = ("dsla", "fold")


class ModelRunner:
    def __init__(self, model: HybridLM, dsla_layers: Iterable[int] = (), dsla_prefill: str = "dsla") -> None:
        """``dsla_prefill``: how a new request's prompt goes through the plan's DSLA layers. "dsla":
        their DSLA forms (chunked linear attention plus the window). "fold": softmax attention in
        every layer, then, once the prompt is done, the plan's layers folded into DSLA state (as a
        conversion folds a request in flight) before it decodes. Folding costs ~20 ms per layer for
        4k tokens, and at such lengths our attention kernel makes an exact prefill cheaper than the
        DSLA one; the request holds its whole KV until then."""
        if dsla_prefill not in DSLA_PREFILL:
            raise ValueError(f"--dsla-prefill={dsla_prefill!r} must be one of {', '.join(DSLA_PREFILL)}")
        self.model = model
        self.dsla_prefill = dsla_prefill
        self._costs: dict[tuple[int, ...], CacheCost] = {}
        self.plan: tuple[int, ...] = ()
        self.set_plan(dsla_layers)
        self.caches: dict[str, RequestCache] = {}
        self.generators: dict[str, torch.Generator | None] = {}

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    @property
    def max_model_len(self) -> int:
        return self.model.cfg.max_position_embeddings

    def set_plan(self, dsla_layers: Iterable[int]) -> None:
        """Layers that run DSLA for requests admitted from now on (raises if one lacks a module)."""
        plan = tuple(sorted(set(dsla_layers)))
        self.model.new_cache(plan)  # validates the layer indices and that DSLA modules exist
        self.plan = plan

    def cache_cost(self, dsla_layers: Iterable[int] | None = None) -> CacheCost:
        """The byte cost of a cache whose ``dsla_layers`` (default: the plan) run DSLA, measured on
        a fresh cache. Folding a layer keeps the other layers' KV buffers as they are, so a
        converted request's capacity stays valid under the cost of its new layer set."""
        layers = tuple(sorted(set(self.plan if dsla_layers is None else dsla_layers)))
        if layers not in self._costs:
            probe = self.model.new_cache(layers)
            cfg, elem = self.model.cfg, self.model.model.embed_tokens.weight.element_size()
            # KV heads cached per token: every head of an attention layer, a DSLA layer's exact groups
            heads = sum(len(self.model.dsla[str(i)].exact_groups) if i in layers else cfg.num_key_value_heads
                        for i in range(cfg.num_hidden_layers))
            per_token = 2 * heads * cfg.head_dim * elem  # K and V
            fixed = sum(s.fixed_nbytes for i, s in enumerate(probe.layers) if i in layers)
            initial = (probe.nbytes - fixed) // per_token if per_token else 0
            self._costs[layers] = CacheCost(kv_bytes_per_token=per_token, fixed_bytes=fixed, initial_capacity=initial)
        return self._costs[layers]

    def admission_layers(self) -> tuple[int, ...]:
        """The DSLA layers of a new request's cache: the plan, or none when prompts prefill exactly
        and are folded afterwards (``dsla_prefill="fold"``)."""
        return () if self.dsla_prefill == "fold" else self.plan

    def fold_to_plan(self, request_id: str) -> str | None:
        """Fold the plan's layers that a request's cache still holds as KV (``dsla_prefill="fold"``,
        its prompt done). Returns None, or the error if a fold failed (a non-finite state); the
        layers folded before it stay folded. (The caller reprices the request from its layers.)"""
        cache = self.caches[request_id]
        done = set(cache.dsla_layers())
        for i in self.plan:
            if i not in done:
                try:
                    self.model.convert_layer(cache, i)
                except ValueError as e:
                    return str(e)
        return None

    def dsla_layers_of(self, request_id: str) -> tuple[int, ...]:
        """Layers that run DSLA for a request holding a cache (its plan at admission + conversions)."""
        return tuple(self.caches[request_id].dsla_layers())

    def convert(self, layer: int, skip: Iterable[str] = ()) -> tuple[dict[str, int], dict[str, str]]:
        """Fold ``layer``'s KV into DSLA state in every live cache but those of ``skip`` (caches
        already DSLA there are left alone). Returns the bytes freed per request (KV dropped minus
        state added) and, per request whose fold failed (a non-finite state), the error; those
        caches are unchanged."""
        freed, failed = {}, {}
        skip = set(skip)
        for rid, cache in self.caches.items():
            if rid in skip:
                continue
            try:
                freed[rid] = self.model.convert_layer(cache, layer)
            except ValueError as e:
                failed[rid] = str(e)
        return freed, failed

    def cache_bytes(self) -> int:
        """Bytes all live caches hold right now (what the budget is about)."""
        return sum(c.nbytes for c in self.caches.values())

    def cache_bytes_by_kind(self) -> tuple[int, int]:
        """(KV bytes: attention layers and DSLA layers' exact groups, DSLA-state bytes: states and
        windows) over all live caches; they sum to ``cache_bytes``."""
        total = state = 0
        for c in self.caches.values():
            total += c.nbytes
            state += sum(c.layers[i].fixed_nbytes for i in c.dsla_layers())
        return total - state, state

    def free(self, request_ids: Iterable[str]) -> None:
        """Drop caches (preempted, aborted or finished requests); generators survive preemption."""
        for rid in request_ids:
            self._drop(rid)

    def release(self, request_id: str) -> None:
        """Forget everything about a request that has ended."""
        self._drop(request_id)
        self.generators.pop(request_id, None)

    def _drop(self, request_id: str) -> None:
        cache = self.caches.pop(request_id, None)
        if cache is not None:
            cache.release()  # its rows of shared KV batches go with it

    def _generator(self, req: Request) -> torch.Generator | None:
        if req.request_id not in self.generators:
            self.generators[req.request_id] = req.options.generator()
        return self.generators[req.request_id]

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, StepResult]:
        """Run the step's chunks as one forward; return a result per scheduled request id."""
        ids: list[int] = []
        seq_lens: list[int] = []
        caches: list[RequestCache] = []
        rows: list[int] = []  # flattened-token indices whose logits we need
        plan = []  # per chunk: (request, first prompt-score row, prompt positions [lo, hi), sample row)
        for c in out.chunks:
            req = c.request
            cache = self.caches.get(req.request_id)
            if cache is None:
                if c.start != 0:
                    raise RuntimeError(f"request {req.request_id} resumes at token {c.start} without a cache")
                # KV buffers sized as the scheduler reserved them (its accounting replays them)
                cache = self.caches[req.request_id] = self.model.new_cache(self.admission_layers(), req.kv_capacity)
            base = len(ids)
            ids += req.token_ids(c.start, c.start + c.num_tokens)
            seq_lens.append(c.num_tokens)
            caches.append(cache)
            # Logits at position p score prompt token p + 1; score each prompt token once.
            lo, hi = c.start, c.start
            if req.options.prompt_logprobs:
                lo = max(c.start, len(req.prompt_logprobs))
                hi = max(lo, min(c.start + c.num_tokens, req.num_prompt_tokens - 1))
            first_prompt_row = len(rows)
            rows += range(base + lo - c.start, base + hi - c.start)
            sample_row = None
            if c.samples:
                sample_row = len(rows)
                rows.append(base + c.num_tokens - 1)
            plan.append((req, first_prompt_row, lo, hi, sample_row))
        dev = self.device
        logits = self.model(torch.tensor(ids, device=dev), seq_lens, caches,
                            logits_for=torch.tensor(rows, dtype=torch.long, device=dev)).float()  # (M, vocab)
        # greedy requests' tokens in one argmax over every row (one call per request cost ~30 us each)
        greedy = logits.argmax(-1).tolist() if any(s is not None and r.options.temperature == 0
                                                  for r, _, _, _, s in plan) else None
        results: dict[str, StepResult] = {}
        for req, first, lo, hi, sample_row in plan:
            res = results[req.request_id] = StepResult()
            try:  # one request's sampling failing (e.g. non-finite logits) must not fail the others
                self._sample_one(req, res, logits, first, lo, hi, sample_row, greedy)
            except Exception as e:
                res.token_id, res.error = None, f"sampling failed: {type(e).__name__}: {e}"
        return results

    def _sample_one(self, req: Request, res: StepResult, logits: Tensor, first: int, lo: int, hi: int,
                    sample_row: int | None, greedy: list[int] | None = None) -> None:
        """Fill ``res`` for one request from its rows of the step's (M, vocab) logits (``greedy``:
        every row's argmax, when the step has greedy requests)."""
        o = req.options
        if hi > lo:
            lp = logits[first: first + hi - lo].log_softmax(-1)  # (hi - lo, vocab)
            res.prompt_logprobs = token_logprobs(lp, req.prompt_token_ids[lo + 1: hi + 1], o.logprobs or 0)
        if sample_row is None:
            return
        row = logits[sample_row]  # (vocab,)
        if o.temperature == 0:
            tok = greedy[sample_row] if greedy is not None else int(row.argmax())
        else:
            tok = sample(row, o, self._generator(req))
        res.token_id = tok
        if o.logprobs is not None:
            res.logprob = token_logprobs(row.log_softmax(-1)[None], [tok], o.logprobs)[0]
