import time, statistics, torch, torch.nn.functional as F
from dsla.model import llama, quant
from dsla.model.loading import load_teacher
from dsla.model.quant import load_dtype, quantize_model
from dsla.paths import default_teacher_dir
from dsla.ops.rope import apply_rope
torch.set_num_threads(2)
def old_norm(self, x):
    h = x.float(); h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps); return self.weight * h.to(x.dtype)
def old_rope(x, cos, sin):
    cos, sin = cos.to(x.dtype), sin.to(x.dtype); half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin
def old_attn(self, x, cos, sin, seq_lens, states=None):
    q = old_rope(llama.split_heads(self.q_proj(x), self.cfg.num_attention_heads), cos, sin)
    k_raw, v = self._kv(x); k = old_rope(k_raw, cos, sin)
    return self.o_proj(llama.decode_attention(q, k, v, states))
def old_q(self, x):
    x2 = x.reshape(-1, self.in_features)
    if self.dense is not None and x2.shape[0] > self.dense_above: return self.dense(x)
    return self._kernel(x2.contiguous()).view(*x.shape[:-1], self.out_features)
new = (llama.RMSNorm.forward, llama.LlamaAttention.forward, quant._QuantizedLinear.forward)
old = (old_norm, old_attn, old_q)
def use(fs): llama.RMSNorm.forward, llama.LlamaAttention.forward, quant._QuantizedLinear.forward = fs
m = load_teacher(default_teacher_dir(), dtype=load_dtype("mixed", torch.bfloat16))
quantize_model(m, "mixed", torch.bfloat16)
res = {}
for B in (1, 8):
    caches = [m.new_cache([], 1200) for _ in range(B)]
    with torch.inference_mode():
        for c in caches: m(torch.randint(0, 1000, (512,)), [512], [c], logits_for=torch.tensor([511]))
        t = {"old": [], "new": []}
        for rnd in range(12):
            for name, fs in (("old", old), ("new", new)) if rnd % 2 else (("new", new), ("old", old)):
                use(fs)
                for _ in range(2): m(torch.randint(0, 1000, (B,)), [1]*B, caches, logits_for=torch.arange(B))
                t0 = time.perf_counter()
                for _ in range(10): m(torch.randint(0, 1000, (B,)), [1]*B, caches, logits_for=torch.arange(B))
                t[name].append((time.perf_counter() - t0) / 10 * 1e3)
    res[B] = {k: round(statistics.median(v), 2) for k, v in t.items()}
    print(B, res[B], {k: [round(x,1) for x in v] for k,v in t.items()}, flush=True)
