"""Weight-only quantised linear layers for CPU inference, and the rule that picks them.

Two storage formats, each with a plain reference (``quantize_*`` / ``dequantize_*``) and a
module that runs PyTorch's fused CPU kernel on it:

- **int4**, groups of G = 32 along the input dim, asymmetric: ``w = d * q + m`` with q in 0..15,
  d = (max - min) / 15 and m = min of the group. This is GGUF's Q4_1 block, so quantising a
  teacher dequantised from Q4_1 recovers its q, d and m (exactly, for SmolLM2's GGUF). The kernel
  (``aten._weight_int4pack_mm_for_cpu``) takes ``(q - 8) * scale + zero`` with scale and zero in
  the activation dtype: scale = d, zero = m + 8d, so in bfloat16 they lose a few bits against
  GGUF's float16 d and m (``dsla bench quant`` measures what that costs).
- **int8**, one scale per output channel, symmetric: ``w = s * q`` with q in -127..127 and
  s = max|w| / 127 (``aten._weight_int8pack_mm``). For the lm_head (GGUF stores it as Q8_0) and
  the DSLA layers' own trained q/o projections, which have no 4-bit grid to recover.

A third module keeps the weight unquantised but **prepacked for oneDNN** (``PackedLinear``, preset
``packed``), as vLLM's CPU backend does: the same bf16 or float32 weight, reordered once into
oneDNN's blocked layout, so a call does no reorder of its own (``F.linear`` in bf16 is slow from
about 8 rows on).

A quantised module may also keep a dense copy (``dense_above``): a call with more rows than that
runs the dense weight instead of the quantised kernel (the kernel is slower than a bf16 linear
for the many rows of a prefill). The ``mixed`` preset does that: int4/int8 kernels for decode steps (few rows,
bound by reading the weights), the bf16 weights for batched steps and prefill chunks, at the memory
of both copies. The dense copy is a ``CodedLinear`` (``dense_linear``) where one-byte codes give the
bf16 weight back exactly (GGUF Q4_1 / Q8_0 blocks, as the default teacher's) and our kernel runs,
else a ``PackedLinear``.

``--weights`` names a preset (``WEIGHT_PRESETS``); ``auto`` resolves by ``choose_weights``. The
measurement behind the rule (1 thread, 2-core AMD EPYC with avx512_bf16, busy machine, torch 2.13; microseconds per call of
the SmolLM2 shapes, batch 1 / 8):

    shape (out x in)   bf16 linear   int4 bf16   int8 bf16   fp32 linear   int4 fp32
    1536 x 576           297 / 528    64 / 258    69 / 303     312 / 569   1542 / 12650
    576 x 1536           325 / 401    79 / 228    75 / 218     249 / 470   1572 / 12419
    49152 x 576 (head)  6910 / 8522 1876 / 5718 4112 / 11634 10351 / 19524 48933 / 400566

So with bfloat16 activations on a CPU with native bf16 both kernels are 2-5x faster than a bf16
linear; with float32 activations they are 5-20x slower than a float32 linear (the kernels are
not vectorised for float32), so a quantised path is only offered with bfloat16. Quantisation is
for inference only: the modules hold buffers, no parameters, and are not trained.
With tied embeddings (SmolLM2) a packed or quantised lm_head is a second copy of the embedding
(the lookup keeps the native one): ``packed`` holds 57 MB more than ``native`` for the default
teacher, and ``mixed`` holds the int4/int8 and a dense copy (codes or packed) of every linear.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

GROUP_SIZE = 32  # GGUF's Q4_1 / Q8_0 block length along the input dim
WEIGHT_CHOICES = ("auto", "native", "packed", "int8", "int4", "mixed")  # --weights
# mixed: calls with more rows than this use the dense copy. Measured (2 threads, 2-core EPYC with
# avx512_bf16, torch 2.13, SmolLM2's MLP shapes, busy machine): the int4 kernel beat a bf16 linear
# up to 4-8 rows and lost from 16 rows on.
MIXED_MAX_ROWS = 8


@dataclass(frozen=True)
class WeightPlan:
    """Storage per kind of linear layer: "native" (the model dtype), "packed" (the model dtype,
    prepacked for oneDNN), "int8" or "int4"."""

    teacher: str  # the teacher blocks' q/k/v/o and MLP gate/up/down projections
    lm_head: str  # the output projection (tied to the embedding in SmolLM2; the lookup stays native)
    dsla: str  # the DSLA layers' own (trained) q/o projections
    dense_above: int | None = None  # quantised modules also keep the dense weight for calls of more rows


WEIGHT_PRESETS = {
    "native": WeightPlan("native", "native", "native"),
    "packed": WeightPlan("packed", "packed", "packed"),
    "int8": WeightPlan("int8", "int8", "int8"),
    # lm_head int8: its GGUF source is Q8_0, which int4 would degrade; DSLA q/o: trained, no 4-bit grid
    "int4": WeightPlan("int4", "int8", "int8"),
    # int4's kernels for decode steps of at most MIXED_MAX_ROWS rows, the dense weights for prefill
    "mixed": WeightPlan("int4", "int8", "int8", dense_above=MIXED_MAX_ROWS),
}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with native bf16 dot products


# ---- reference formats ------------------------------------------------------------------------
def quantize_int4(w: Tensor, group_size: int = GROUP_SIZE) -> tuple[Tensor, Tensor, Tensor]:
    """w (N, K) -> q (N, K) int32 in 0..15, d (N, K/G) and m (N, K/G) float32, w ~ d * q + m."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4 needs the input dim {K} to be a multiple of the group size {group_size}; "
                         "use --weights int8 or native for this model")
    blocks = w.float().view(N, K // group_size, group_size)  # (N, K/G, G)
    m = blocks.amin(-1)
    d = (blocks.amax(-1) - m) / 15
    q = ((blocks - m[..., None]) / torch.where(d == 0, 1.0, d)[..., None]).round().clamp(0, 15)
    return q.to(torch.int32).view(N, K), d, m


def dequantize_int4(q: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """The float32 weight (N, K) of ``quantize_int4``'s output."""
    N, K = q.shape
    G = K // d.shape[1]
    return (q.view(N, -1, G).float() * d[..., None] + m[..., None]).view(N, K)


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (N, K) -> q (N, K) int8 in -127..127 and s (N,) float32, w ~ s[:, None] * q."""
    s = w.float().abs().amax(1) / 127
    q = (w.float() / torch.where(s == 0, 1.0, s)[:, None]).round().clamp(-127, 127)
    return q.to(torch.int8), s


def dequantize_int8(q: Tensor, s: Tensor) -> Tensor:
    return q.float() * s[:, None]


def pack_codes(w: Tensor) -> tuple[Tensor, Tensor] | None:
    """The one-byte codes of ``csrc/coded_linear.cpp`` for a float32 weight w (N, K), or None where
    they would not give back w's bfloat16 rounding exactly, element for element (then the packed
    bf16 weight serves), or N is not a multiple of 64 or K of 32.

    W[n, k] = bfloat16(d * q + m) per column n and group of 32 inputs (d * q rounded to float32, then
    the sum: the kernel rounds the same way). Q4_1's form (q in 0..15, ``quantize_int4``) is tried
    first, then Q8_0's (m = 0, d = max|w| / 127, q in -127..127). A teacher dequantised from those
    GGUF blocks is recovered exactly. Returns codes (N/64, K/2, 64, 2) int8 and dm (N/64, K/32, 2, 64)
    float32 (d then m): codes[b, p, j, i] = q[64 b + j, 2 p + i], dm[b, g, :, j] = d, m of column
    64 b + j, group g."""
    N, K = w.shape
    G = GROUP_SIZE  # the kernel's group
    if N % 64 or K % G or w.dtype != torch.float32:
        return None
    w = w.contiguous()
    target = w.to(torch.bfloat16)
    q, d, m = quantize_int4(w, G)
    if not torch.equal(dequantize_int4(q, d, m).to(torch.bfloat16), target):
        blocks = w.view(N, K // G, G)
        d = blocks.abs().amax(-1) / 127
        q = (blocks / torch.where(d == 0, 1.0, d)[..., None]).round().clamp(-127, 127).to(torch.int32).view(N, K)
        m = torch.zeros_like(d)
        if not torch.equal(dequantize_int4(q, d, m).to(torch.bfloat16), target):
            return None
    codes = q.to(torch.int8).view(N // 64, 64, K // 2, 2).permute(0, 2, 1, 3).contiguous()
    dm = torch.stack([d, m], 1).view(N // 64, 64, 2, K // G).permute(0, 3, 2, 1).contiguous()
    return codes, dm


# ---- modules ---------------------------------------------------------------------------------
class PackedLinear(nn.Module):
    """y = x W^T with W in ``dtype``, prepacked for oneDNN once; x (..., K) in ``dtype`` -> (..., N).

    The packed weight is an opaque oneDNN tensor: a non-persistent buffer (no state_dict entry);
    the module cannot be cast to another dtype or deep-copied."""

    def __init__(self, weight: Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        check_packed(weight.device.type, dtype)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        w = weight.detach().to(dtype).contiguous()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(w, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != self.packed.dtype:  # oneDNN's own message would not say this
            raise TypeError(f"PackedLinear: input dtype {x.dtype} differs from the packed weight's {self.packed.dtype}")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.packed.dtype}"


class CodedLinear(nn.Module):
    """y = x W^T with W = bfloat16(d * q + m) held as one-byte codes (``pack_codes``), run by our
    kernel (``csrc/coded_linear.cpp``); x (..., K) bfloat16 -> (..., N). The same values as the packed
    bf16 weight, at ~1.25 bytes a weight against 2: 1.12-1.52x oneDNN's packed linear at 48 rows,
    1.04-1.20x at 16, 128 and 512, slower at 1 row, where ``mixed`` runs int4 (docs/results/speed.md 0j). Where our kernels are off or unavailable at call time, the weight is
    decoded once into a ``PackedLinear`` (kept outside the module tree: it cannot be cast or copied)."""

    def __init__(self, codes: Tensor, dm: Tensor) -> None:
        super().__init__()
        nb, kp = codes.shape[0], codes.shape[1]
        if (codes.dtype != torch.int8 or dm.dtype != torch.float32 or tuple(codes.shape[2:]) != (64, 2)
                or tuple(dm.shape) != (nb, kp * 2 // GROUP_SIZE, 2, 64) or (kp * 2) % GROUP_SIZE):
            raise ValueError(f"CodedLinear: codes {tuple(codes.shape)} {codes.dtype} and dm {tuple(dm.shape)} "
                             f"{dm.dtype} are not pack_codes' layout")
        self.out_features, self.in_features = nb * 64, kp * 2
        self.register_buffer("codes", codes)  # (N/64, K/2, 64, 2) int8
        # (N/64, K/32, 2, 64) float32, held as int32 bits: model.to(dtype) must not round it
        self.register_buffer("dm_bits", dm.view(torch.int32))
        object.__setattr__(self, "_fallback", None)  # not a submodule

    @property
    def dm(self) -> Tensor:
        return self.dm_bits.view(torch.float32)

    def weight(self) -> Tensor:
        """The float32 weight (N, K) the codes hold (its bfloat16 rounding is what runs)."""
        q = self.codes.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)
        d, m = (t.permute(0, 2, 1).reshape(self.out_features, -1) for t in self.dm.unbind(2))
        return dequantize_int4(q, d, m)  # the same form, whatever range q spans

    def forward(self, x: Tensor) -> Tensor:
        from dsla.ops.cpu_kernels import coded_linear_cpu, coded_linear_kernel

        if x.dtype != torch.bfloat16:
            raise TypeError(f"CodedLinear: input dtype {x.dtype}, but its weights run in bfloat16")
        lib = coded_linear_kernel()
        if lib is None:
            if self._fallback is None:
                object.__setattr__(self, "_fallback", PackedLinear(self.weight(), torch.bfloat16))
            return self._fallback(x)
        if x.dim() == 2 and x.stride(1) == 1:
            return coded_linear_cpu(lib, x, self.codes, self.dm)
        x2 = x.reshape(-1, self.in_features).contiguous()
        return coded_linear_cpu(lib, x2, self.codes, self.dm).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, codes=int8"


def dense_linear(weight: Tensor, dtype: torch.dtype) -> nn.Module:
    """The module for calls of many rows: ``CodedLinear`` where the weight is exactly in its form,
    the dtype is bfloat16 and our kernel runs here; else the weight prepacked for oneDNN."""
    from dsla.ops.cpu_kernels import coded_linear_kernel

    if dtype == torch.bfloat16 and weight.device.type == "cpu" and coded_linear_kernel() is not None:
        packed = pack_codes(weight.detach())
        if packed is not None:
            return CodedLinear(*packed)
    return PackedLinear(weight, dtype)


def check_packed(device_type: str, dtype: torch.dtype) -> None:
    """Raise ValueError where oneDNN's packed linear cannot run: off CPU, or bf16 without its support."""
    if device_type != "cpu":
        raise ValueError(f"the packed weight path runs on CPU only, not {device_type}: use --weights native")
    if not torch.backends.mkldnn.is_available():
        raise ValueError("this torch build has no oneDNN (mkldnn): use --weights native")
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ValueError("oneDNN has no bfloat16 support on this CPU: use --weights native or int4 "
                         "(or --dtype float32 with --weights packed)")
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"packed weights are bfloat16 or float32, not {dtype}")


class _QuantizedLinear(nn.Module):
    """A quantised kernel ``_kernel`` (M, K) -> (M, N), with an optional packed copy (``dense``)
    for calls of more than ``dense_above`` rows."""

    in_features: int
    out_features: int

    def _keep_dense(self, weight: Tensor, dtype: torch.dtype, dense_above: int | None) -> None:
        if dense_above is not None and dense_above < 0:
            raise ValueError(f"dense_above={dense_above} must be >= 0 (or None: no dense copy)")
        self.dense_above = dense_above
        self.dense = None if dense_above is None else dense_linear(weight, dtype)

    def _kernel(self, x2: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.dense is not None and x.numel() > self.dense_above * self.in_features:
            return self.dense(x)
        if x.dim() == 2 and x.is_contiguous():  # the model's (N, hidden) rows: no reshape or view (decode hot path)
            return self._kernel(x)
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        return self._kernel(x2.contiguous()).view(*x.shape[:-1], self.out_features)  # the kernels need x contiguous

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}" + (
            "" if self.dense is None else f", dense_above={self.dense_above}")


class Int4Linear(_QuantizedLinear):
    """y = x W^T with W in 4-bit groups (see the module doc); x (..., K) in ``dtype`` -> (..., N)."""

    def __init__(self, weight: Tensor, dtype: torch.dtype, group_size: int = GROUP_SIZE,
                 dense_above: int | None = None) -> None:
        super().__init__()
        if weight.device.type != "cpu":
            raise ValueError(f"the int4 weight path runs on CPU only, not {weight.device}: use --weights native")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.group_size = group_size
        q, d, m = quantize_int4(weight, group_size)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))  # (N, K/2) uint8
        self.register_buffer("scales_and_zeros", torch.stack([d, m + 8 * d], -1).transpose(0, 1).contiguous().to(dtype))  # (K/G, N, 2)
        self._keep_dense(weight, dtype, dense_above)

    def _kernel(self, x2: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


class Int8Linear(_QuantizedLinear):
    """y = x W^T with W int8 per output channel; x (..., K) in ``dtype`` -> (..., N)."""

    def __init__(self, weight: Tensor, dtype: torch.dtype, dense_above: int | None = None) -> None:
        super().__init__()
        if weight.device.type != "cpu":
            raise ValueError(f"the int8 weight path runs on CPU only, not {weight.device}: use --weights native")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        q, s = quantize_int8(weight)
        self.register_buffer("qweight", q)  # (N, K) int8
        self.register_buffer("scales", s.to(dtype))  # (N,)
        self._keep_dense(weight, dtype, dense_above)

    def _kernel(self, x2: Tensor) -> Tensor:
        return torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)


def quantized_linear(weight: Tensor, kind: str, dtype: torch.dtype, dense_above: int | None = None) -> nn.Module:
    if kind == "packed":
        return PackedLinear(weight, dtype)
    if kind == "int4":
        return Int4Linear(weight, dtype, dense_above=dense_above)
    return Int8Linear(weight, dtype, dense_above=dense_above)


# ---- choosing and applying --------------------------------------------------------------------
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16_flags(flags: frozenset[str] | None = None) -> list[str]:
    """The ``BF16_CPU_FLAGS`` this CPU has (``flags``, default: ``cpu_flags()``), sorted; empty: none."""
    return sorted(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))


def choose_weights(requested: str, dtype: torch.dtype, device_type: str,
                   flags: frozenset[str] | None = None) -> tuple[str, str]:
    """The preset to run (native, packed, int8, int4 or mixed) and why, for ``--weights requested``.

    ``auto``: mixed (int4 for decode steps, dense for prefill) on a CPU with native bf16
    (``BF16_CPU_FLAGS``) running bfloat16; native
    otherwise (float32 activations, CUDA, or a CPU where the kernels were not measured).
    An explicit int8/int4/mixed with float32 or off CPU raises ValueError (slow or unsupported), as
    does packed where oneDNN cannot run it (``check_packed``).
    """
    if requested not in WEIGHT_CHOICES:
        raise ValueError(f"--weights {requested!r} is not one of {', '.join(WEIGHT_CHOICES)}")
    if requested == "native":
        return "native", "requested"
    if requested == "packed":
        check_packed(device_type, dtype)
        return "packed", "requested"
    if requested == "auto":
        if device_type != "cpu":
            return "native", f"device {device_type}: the quantised kernels here are CPU-only"
        if dtype != torch.bfloat16:
            return "native", f"dtype {dtype}: int4/int8 kernels are 5-20x slower than a float32 linear"
        have = native_bf16_flags(flags)
        if not have:
            return "native", f"CPU lacks {' / '.join(BF16_CPU_FLAGS)}: the quantised kernels were not measured there"
        try:
            check_packed(device_type, dtype)
        except ValueError as e:
            return "int4", f"bfloat16 on a CPU with {', '.join(have)}; no packed copy for prefill ({e})"
        return "mixed", (f"bfloat16 on a CPU with {', '.join(have)}: int4 linears measured 2-5x faster than bf16 "
                         f"for decode steps (<= {MIXED_MAX_ROWS} rows); bf16 weights (codes or packed) for more rows")
    if device_type != "cpu":
        raise ValueError(f"--weights {requested} runs on CPU only (device is {device_type}): use --weights native")
    if dtype != torch.bfloat16:
        raise ValueError(f"--weights {requested} needs --dtype bfloat16: with {dtype} activations the CPU kernels "
                         "are 5-20x slower than a native linear. Use --dtype bfloat16, or --weights native")
    if requested == "mixed":  # its prefill copy is a oneDNN-packed one
        check_packed(device_type, dtype)
    return requested, "requested"


def quantize_model(model: nn.Module, preset: str, dtype: torch.dtype | None = None) -> WeightPlan:
    """Replace the linear layers of a loaded ``HybridLM`` (teacher, lm_head, and any DSLA q/o
    already attached) in place by quantised modules of ``WEIGHT_PRESETS[preset]``; return the plan.

    The blocks are computed from the weights at the model's current precision, the scales kept
    in ``dtype`` (the activation dtype; default: the model's), and the rest of the model is then
    cast to ``dtype``. Load in float32 (``load_dtype``): a teacher dequantised from GGUF then
    gives back its exact blocks, which bfloat16-rounded weights would not. For inference only:
    attach DSLA layers (or load a student) first. The embedding lookup stays native; with tied
    embeddings the lm_head becomes a quantised copy of it.
    """
    if preset not in WEIGHT_PRESETS:
        raise ValueError(f"weight preset {preset!r} is not one of {', '.join(WEIGHT_PRESETS)} "
                         "(resolve 'auto' with choose_weights first)")
    plan = WEIGHT_PRESETS[preset]
    dtype = dtype or model.model.embed_tokens.weight.dtype
    with torch.no_grad():
        if plan.teacher != "native":
            for block in model.model.layers:
                # k and v, gate and up: one linear each (their outputs side by side; every output row
                # is quantised on its own, so the values are those of the separate linears)
                _fuse(block.self_attn, ("k_proj", "v_proj"), "kv_proj", plan.teacher, dtype, plan.dense_above)
                _fuse(block.mlp, ("gate_proj", "up_proj"), "gate_up_proj", plan.teacher, dtype, plan.dense_above)
                for parent, names in ((block.self_attn, ("q_proj", "o_proj")), (block.mlp, ("down_proj",))):
                    for name in names:
                        _replace(parent, name, plan.teacher, dtype, plan.dense_above)
        if plan.lm_head != "native" and model.weights == "native":  # a second call: already replaced
            w = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
            model.lm_head = quantized_linear(w, plan.lm_head, dtype, plan.dense_above)
        if plan.dsla != "native":
            for mod in model.dsla.values():
                _replace(mod, "q_proj", plan.dsla, dtype, plan.dense_above)
                _replace(mod, "o_proj", plan.dsla, dtype, plan.dense_above)
    # floating tensors only: the int8 / packed int4 buffers stay as they are; the oneDNN-packed ones
    # are already in ``dtype`` (they cannot be cast)
    model.to(dtype=dtype)
    model.weights = preset
    log.info("weights %s: teacher linears %s, lm_head %s, DSLA q/o %s", preset, plan.teacher, plan.lm_head, plan.dsla)
    return plan


def _fuse(parent: nn.Module, names: tuple[str, str], fused: str, kind: str, dtype: torch.dtype,
          dense_above: int | None) -> None:
    """Replace two linears of one input by one quantised linear of both outputs, in order
    (``LlamaAttention.kv``, ``LlamaMLP.forward`` split it back)."""
    if hasattr(parent, fused):  # a second call
        return
    a, b = (getattr(parent, n) for n in names)
    setattr(parent, fused, quantized_linear(torch.cat([a.weight, b.weight]), kind, dtype, dense_above))
    for n in names:
        delattr(parent, n)


def _replace(parent: nn.Module, name: str, kind: str, dtype: torch.dtype, dense_above: int | None) -> None:
    old = getattr(parent, name)
    if isinstance(old, nn.Linear):  # already quantised (a second call) stays as it is
        setattr(parent, name, quantized_linear(old.weight, kind, dtype, dense_above))


def load_dtype(preset: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype to load a teacher in before ``quantize_model(model, preset, dtype)``: float32
    for a quantised preset (int8, int4, mixed) (exact blocks from the full-precision weights), else ``dtype``."""
    return dtype if preset in ("native", "packed") else torch.float32


def check_int4_dims(cfg, requested: str, preset: str, reason: str) -> tuple[str, str]:
    """int4 needs every linear's input dim to be a multiple of the group: ``auto`` falls back to
    int8 when it is not; an explicit int4 raises ValueError."""
    odd = [d for d in (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim)
           if d % GROUP_SIZE]
    if preset not in ("int4", "mixed") or not odd:
        return preset, reason
    if requested != "auto":
        raise ValueError(f"--weights {preset} needs every linear's input dim to be a multiple of {GROUP_SIZE} "
                         f"(this model has {odd}): use --weights int8, packed or native")
    return "int8", f"int4 needs input dims that are multiples of {GROUP_SIZE} (this model has {odd})"


def resolve_weights(requested: str, dtype: torch.dtype, cfg, device_type: str = "cpu") -> tuple[str, str]:
    """``choose_weights`` then ``check_int4_dims`` for a model of config ``cfg``: (preset, reason)."""
    preset, reason = choose_weights(requested, dtype, device_type)
    return check_int4_dims(cfg, requested, preset, reason)
