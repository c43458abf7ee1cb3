"""In-process A/B of the eighth session's decode op trimming (docs/results/speed.md, section 0b).

The old forms of RMSNorm, the decode-path attention's RoPE and the quantised linears' forward are
restored by monkeypatching, alternating with the current code 12 times per batch size on one model
(the teacher, `mixed` weights, bfloat16, 2 threads, 512-token caches); prints the medians in ms.

    HF_HUB_OFFLINE=1 .venv/bin/python docs/results/speed/session8/ab_decode_ops.py
"""

import statistics
import time

import torch

from dsla.model import llama, quant
from dsla.model.loading import load_teacher
from dsla.model.quant import load_dtype, quantize_model
from dsla.paths import default_teacher_dir


def old_norm(self, x):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * h.to(x.dtype)


def old_rope(x, cos, sin):
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def old_attn(self, x, cos, sin, seq_lens, states=None):  # the decode branch only (what this A/B runs)
    q = old_rope(llama.split_heads(self.q_proj(x), self.cfg.num_attention_heads), cos, sin)
    k = old_rope(llama.split_heads(self.k_proj(x), self.cfg.num_key_value_heads), cos, sin)
    v = llama.split_heads(self.v_proj(x), self.cfg.num_key_value_heads)
    return self.o_proj(llama.decode_attention(q, k, v, states))


def old_linear(self, x):
    x2 = x.reshape(-1, self.in_features)
    if self.dense is not None and x2.shape[0] > self.dense_above:
        return self.dense(x)
    return self._kernel(x2.contiguous()).view(*x.shape[:-1], self.out_features)


NEW = (llama.RMSNorm.forward, llama.LlamaAttention.forward, quant._QuantizedLinear.forward)
OLD = (old_norm, old_attn, old_linear)


def use(forms) -> None:
    llama.RMSNorm.forward, llama.LlamaAttention.forward, quant._QuantizedLinear.forward = forms


def main() -> None:
    torch.set_num_threads(2)
    m = load_teacher(default_teacher_dir(), dtype=load_dtype("mixed", torch.bfloat16))
    quantize_model(m, "mixed", torch.bfloat16)
    for B in (1, 8):
        caches = [m.new_cache([], 1200) for _ in range(B)]

        def step() -> None:
            m(torch.randint(0, 1000, (B,)), [1] * B, caches, logits_for=torch.arange(B))

        times = {"old": [], "new": []}
        with torch.inference_mode():
            for c in caches:
                m(torch.randint(0, 1000, (512,)), [512], [c], logits_for=torch.tensor([511]))
            for rnd in range(12):
                pairs = (("old", OLD), ("new", NEW)) if rnd % 2 else (("new", NEW), ("old", OLD))
                for name, forms in pairs:
                    use(forms)
                    for _ in range(2):
                        step()
                    t0 = time.perf_counter()
                    for _ in range(10):
                        step()
                    times[name].append((time.perf_counter() - t0) / 10 * 1e3)
        use(NEW)
        print(B, {k: round(statistics.median(v), 2) for k, v in times.items()},
              {k: [round(x, 1) for x in v] for k, v in times.items()}, flush=True)


if __name__ == "__main__":
    main()
