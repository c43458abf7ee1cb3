"""The peer baseline: a minimal OpenAI-style server that calls transformers' ``generate`` one
request at a time (the reference approach: no batching, no admission control).

Only what ``dsla bench serve`` needs: POST /v1/completions (string prompt, max_tokens,
temperature, top_p, seed, ignore_eos, stream with usage), GET /v1/models, GET /health. One worker
thread takes queued requests in arrival order; tokens stream out through a ``generate`` streamer.
To be fair to it, a request whose client has gone away is skipped (or stopped) rather than
computed for nobody.

    python -m dsla.bench.hf_baseline_server --teacher DIR --port 8001 --threads 2
"""


import argparse
import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Job:
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    ignore_eos: bool
    emit: object  # callable(kind, value) -> None, thread-safe
    cancelled: threading.Event = field(default_factory=threading.Event)


def worker(model, tokenizer, jobs: queue.Queue) -> None:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    class Streamer(BaseStreamer):
        def __init__(self, job: Job) -> None:
            self.job, self.first = job, True

        def put(self, value) -> None:
            if self.first:  # generate() first hands over the prompt
                self.first = False
                return
            for t in value.reshape(-1).tolist():
                self.job.emit("token", t)

        def end(self) -> None:
            pass

    class Cancelled(StoppingCriteria):
        def __init__(self, job: Job) -> None:
            self.job = job

        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), self.job.cancelled.is_set(), dtype=torch.bool)

    while True:
        job: Job = jobs.get()
        if job.cancelled.is_set():
            continue
        try:
            ids = tokenizer(job.prompt, return_tensors="pt", add_special_tokens=False).input_ids
            if job.seed is not None:
                torch.manual_seed(job.seed)
            kw = dict(max_new_tokens=job.max_tokens, do_sample=job.temperature > 0,
                      streamer=Streamer(job), stopping_criteria=StoppingCriteriaList([Cancelled(job)]),
                      pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            if job.temperature > 0:
                kw.update(temperature=job.temperature, top_p=job.top_p)
            if job.ignore_eos:
                kw.update(min_new_tokens=job.max_tokens)
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            job.emit("done", ids.shape[1])
        except Exception as e:  # report and keep serving
            log.exception("generate failed")
            job.emit("error", str(e))


def create_app(model, tokenizer, model_name: str):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    jobs: queue.Queue = queue.Queue()
    threading.Thread(target=worker, args=(model, tokenizer, jobs), daemon=True).start()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "hf-baseline"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if not isinstance(body.get("prompt"), str):
            return JSONResponse({"error": {"message": "prompt must be a string", "type": "invalid_request_error",
                                           "param": "prompt", "code": None}}, status_code=400)
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(body["prompt"], int(body.get("max_tokens") or 16), float(body.get("temperature", 1.0)),
                  float(body.get("top_p", 1.0)), body.get("seed"), bool(body.get("ignore_eos", False)),
                  emit=lambda kind, v: loop.call_soon_threadsafe(q.put_nowait, (kind, v)))
        jobs.put(job)
        rid, eos = f"cmpl-{uuid.uuid4().hex}", tokenizer.eos_token_id

        async def events():
            out: list[int] = []
            text = ""
            try:
                while True:
                    kind, v = await q.get()
                    if kind == "token":
                        if v == eos and not job.ignore_eos:
                            continue
                        out.append(v)
                        new = tokenizer.decode(out, skip_special_tokens=True)
                        if new.endswith("\ufffd"):
                            continue
                        yield "token", new[len(text):]
                        text = new
                    elif kind == "error":
                        yield "error", v
                        return
                    else:
                        yield "done", (v, len(out))
                        return
            finally:
                job.cancelled.set()

        def chunk(text: str, reason: str | None) -> str:
            return "data: " + json.dumps({"id": rid, "object": "text_completion", "created": int(time.time()),
                                          "model": model_name, "choices": [{"index": 0, "text": text,
                                                                            "logprobs": None,
                                                                            "finish_reason": reason}]}) + "\n\n"

        if body.get("stream"):
            async def sse():
                async for kind, v in events():
                    if kind == "token":
                        yield chunk(v, None)
                    elif kind == "error":
                        yield "data: " + json.dumps({"error": {"message": v, "type": "server_error"}}) + "\n\n"
                    else:
                        n_prompt, n_out = v
                        yield chunk("", "length" if n_out >= job.max_tokens else "stop")
                        yield "data: " + json.dumps({"id": rid, "object": "text_completion", "choices": [],
                                                     "model": model_name,
                                                     "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                                               "total_tokens": n_prompt + n_out}}) + "\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")

        text, usage = "", None
        async for kind, v in events():
            if kind == "token":
                text += v
            elif kind == "error":
                return JSONResponse({"error": {"message": v, "type": "server_error"}}, status_code=500)
            else:
                usage = {"prompt_tokens": v[0], "completion_tokens": v[1], "total_tokens": v[0] + v[1]}
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}], "usage": usage}

    return app


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=None, help="HF model directory (default: the prepared teacher)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--served-model-name", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch
    import uvicorn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsla.paths import resolve_teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = resolve_teacher(args.teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    name = args.served_model_name or teacher.name
    log.info("HF baseline serving %s on http://%s:%d (one request at a time)", name, args.host, args.port)
    uvicorn.run(create_app(model, tok, name), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
