"""Frozen, validated configuration. Every field has a default (where one makes sense), a unit and a doc."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling of RoPE (``rope_type: llama3`` in config.json)."""

    factor: float = 8.0  # divide low frequencies by this
    low_freq_factor: float = 1.0  # wavelengths above original_max/low_freq_factor are fully scaled
    high_freq_factor: float = 4.0  # wavelengths below original_max/high_freq_factor are untouched
    original_max_position_embeddings: int = 8192  # context length the model was pre-trained at


@dataclass(frozen=True)
class LlamaConfig:
    """The subset of a Hugging Face Llama config.json that the model needs."""

    vocab_size: int = 49152  # tokens
    hidden_size: int = 576  # model width D_model
    intermediate_size: int = 1536  # SwiGLU hidden width
    num_hidden_layers: int = 30
    num_attention_heads: int = 9  # query heads
    num_key_value_heads: int = 3  # KV heads (GQA groups)
    head_dim: int = 64  # per-head dim D
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: RopeScaling | None = None  # None: plain RoPE
    max_position_embeddings: int = 8192  # tokens of context the model supports
    tie_word_embeddings: bool = True  # lm_head shares the embedding matrix
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)  # any of these ends generation

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config field {name}={getattr(self, name)} must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}: GQA needs whole groups"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (G)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Build from a parsed HF config.json; raise ValueError naming any unsupported field."""
        model_type = d.get("model_type")
        if model_type not in ("llama",):
            raise ValueError(
                f"config field model_type={model_type!r} is not supported: dsla handles Llama-family "
                "checkpoints (model_type 'llama')"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ValueError(f"config field {flag}=true is not supported (Llama without biases only)")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config field hidden_act={act!r} is not supported: only 'silu' (SwiGLU)")
        # transformers >= 5 writes rope settings under rope_parameters; older files use rope_scaling.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type not in ("default", None):
            raise ValueError(f"config field rope type {rope_type!r} is not supported: use default or llama3")
        heads = int(d["num_attention_heads"])
        eos = d.get("eos_token_id", 2)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "LlamaConfig":
        p = Path(path) / "config.json"
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{p} not found: a teacher directory needs a Hugging Face config.json") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON ({e}): re-create the teacher directory") from None
        return cls.from_hf_dict(d)


@dataclass(frozen=True)
class DSLAConfig:
    """Shape and initialisation of a DSLA layer (see dsla/model/dsla.py)."""

    num_states: int = 2  # 2: history + recency (DSLA); 1: single-state gated linear attention (ablation)
    feature_dim: int = 64  # per-head width of each half of the feature map phi (phi has 2x this)
    history_decay_init: float = 0.999  # initial per-token decay of the history state (slow)
    recency_decay_init: float = 0.90  # initial per-token decay of the recency state (fast)
    history_mix_init: float = 0.5  # initial weight gamma of the history state in the output
    chunk_size: int = 64  # tokens per chunk in the chunk-parallel form
    eps: float = 1e-6  # added to the normaliser phi(q).z
    window: int = 0  # tokens of exact softmax attention (the last W); older ones in the states. 0: pure DSLA (the paper)
    sinks: int = 0  # with a window: the first tokens kept exact for every later query (never in the states). 0: none

    def __post_init__(self) -> None:
        if self.num_states not in (1, 2):
            raise ValueError(f"num_states={self.num_states} must be 1 or 2")
        if self.feature_dim <= 0:
            raise ValueError(f"feature_dim={self.feature_dim} must be positive")
        for name in ("history_decay_init", "recency_decay_init", "history_mix_init"):
            val = getattr(self, name)
            if not 0.0 < val < 1.0:
                raise ValueError(f"{name}={val} must lie strictly between 0 and 1")
        if self.num_states == 2 and self.recency_decay_init >= self.history_decay_init:
            raise ValueError(
                f"recency_decay_init={self.recency_decay_init} must be below "
                f"history_decay_init={self.history_decay_init}: the recency state decays faster"
            )
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size={self.chunk_size} must be positive")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window={self.window!r} must be a whole number of tokens >= 0 (0: pure DSLA)")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks={self.sinks!r} must be a whole number of tokens >= 0")
        if self.sinks and not self.window:
            raise ValueError(f"sinks={self.sinks} needs an exact window (window > 0): the sinks are more keys of "
                             "the window's softmax")


# What the end-to-end stage may train in each converted layer. "scalars": the per-head weights of
# the window and of the two states and the biases of the decay gates, i.e. how much each head
# takes from its exact window, its history and its recency (a few thousand numbers for the whole
# model, whatever its size), with q/o, the feature maps and the gates' weights left as they are.
# It re-balances a student at lengths its other parameters were not trained for and keeps the
# artifact's size (all these tensors are DSLA parameters, always stored). "dsla": every DSLA
# parameter (the feature maps and the gates' weights too) but q_proj / o_proj, so a student whose
# q/o were never trained (--no-train-projections) still ships no q/o. "all": q/o as well.
E2E_PARAMS = ("all", "dsla", "scalars")
SCALAR_PARAMS = ("mix_logits", "window_log_scale", "history_gate.bias", "recency_gate.bias")


def parse_exact_groups(spec: str) -> dict[int, tuple[int, ...]]:
    """``DistillConfig.exact_groups`` ("18:1,23:0,23:2") as {layer: KV groups}."""
    out: dict[int, set[int]] = {}
    for item in (t.strip() for t in spec.split(",") if t.strip()):
        layer, sep, group = item.partition(":")
        if not sep or not layer.strip().isdigit() or not group.strip().isdigit():
            raise ValueError(f"exact_groups={spec!r}: {item!r} is not LAYER:GROUP (two whole numbers, e.g. 18:1)")
        out.setdefault(int(layer), set()).add(int(group))
    return {i: tuple(sorted(g)) for i, g in sorted(out.items())}


def format_exact_groups(groups: dict[int, tuple[int, ...]]) -> str:
    """The inverse of ``parse_exact_groups``: "LAYER:GROUP,..." sorted by layer, then group."""
    return ",".join(f"{i}:{g}" for i, gs in sorted(groups.items()) for g in sorted(gs))


@dataclass(frozen=True)
class DistillConfig:
    """Chained layer-wise distillation (dsla/distill/train.py). Token budgets are per layer."""

    dsla: DSLAConfig = field(default_factory=DSLAConfig)  # the layer being trained
    order: str = "entropy"  # entropy: low attention entropy first; reverse: high first; given: --layers
    layers: tuple[int, ...] = ()  # explicit order for order='given' (also limits which layers to train)
    seq_len: int = 1024  # tokens per training window of the layer-wise stage
    attn_sequences: int = 24  # windows per layer for attention-output matching (stage 1)
    attn_steps: int = 60  # optimiser steps of stage 1 (batches drawn in passes over the windows)
    val_sequences: int = 4  # held-out windows per layer for the stage-1 validation metric
    batch_size: int = 4  # windows per optimiser step
    lr: float = 3e-3  # peak Adam lr of the feature maps, gates and mix in stage 1 (warm-up, cosine decay)
    train_projections: bool = True  # stage 1 also trains q_proj/o_proj, on the layer output after o_proj
    proj_lr: float = 1e-3  # peak Adam lr of q_proj/o_proj in stage 1
    layer_kl_sequences: int = 0  # windows per layer for an optional per-layer logit-KL stage after stage 1 (0: off)
    e2e_steps: int = 60  # optimiser steps (one window each) of the end-to-end KL stage over all converted layers (0: off)
    e2e_seq_len: int = 2048  # tokens per window of the end-to-end stage
    e2e_windows: int = 30  # distinct training windows of the end-to-end stage (teacher top-k cached; steps cycle)
    e2e_topk: int = 64  # teacher log-probs kept per position (the rest of the vocabulary is one bucket)
    e2e_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # each step converts round(ratio * layers) layers, drawn from these
    e2e_ce_weight: float = 0.0  # weight of next-token cross-entropy added to the KL (0: KL only)
    e2e_lr: float = 3e-4  # peak Adam lr of the end-to-end and per-layer KL stages (warm-up, cosine decay)
    e2e_params: str = "all"  # what the end-to-end stage trains: all (every parameter of the converted layers), dsla (all but q_proj/o_proj: the feature maps, gates and per-head weights, which ship anyway) or scalars (only each head's window and state weights and the decay gates' biases)
    e2e_weight_lr: float = 0.0  # peak lr of the parameters other than the per-head scalars in the end-to-end stage (0: e2e_lr for all); lets the scalars take a larger e2e_lr
    e2e_save_every: int = 10  # steps between checkpoints of the end-to-end stage (it resumes from the last)
    exact_groups: str = ""  # KV heads kept on exact softmax attention over every token in converted layers (DuoAttention-style), as LAYER:GROUP pairs, e.g. 18:1,23:0,23:2 (empty: none; scripts/probe_exact_heads.py ranks them)
    rank_sequences: int = 16  # calibration windows for the entropy ranking
    seed: int = 0  # everything random derives from this (and the layer index)

    def __post_init__(self) -> None:
        if self.order not in ("entropy", "reverse", "given"):
            raise ValueError(f"order={self.order!r} must be one of entropy, reverse, given")
        if self.order == "given" and not self.layers:
            raise ValueError("order='given' needs an explicit layer list (--layers 3,7,1,...)")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers={self.layers} lists a layer twice")
        for name in ("seq_len", "attn_sequences", "batch_size", "rank_sequences"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        for name in ("attn_steps", "val_sequences", "layer_kl_sequences", "e2e_steps", "e2e_ce_weight", "e2e_weight_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("e2e_seq_len", "e2e_windows", "e2e_topk", "e2e_save_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        # raises on a malformed list; stored in one spelling (sorted, no repeats) so a resume compares equal
        object.__setattr__(self, "exact_groups", format_exact_groups(parse_exact_groups(self.exact_groups)))
        if self.e2e_params not in E2E_PARAMS:
            raise ValueError(f"e2e_params={self.e2e_params!r} must be one of {', '.join(E2E_PARAMS)}")
        if self.e2e_weight_lr and self.e2e_params == "scalars":
            raise ValueError(f"e2e_weight_lr={self.e2e_weight_lr} sets the lr of the parameters other than the per-head "
                             "scalars, and e2e_params='scalars' trains none: drop it or use e2e_params dsla or all")
        if not self.e2e_ratios or any(not 0.0 < r <= 1.0 for r in self.e2e_ratios):
            raise ValueError(f"e2e_ratios={self.e2e_ratios} must be a non-empty list of ratios in (0, 1]")
