"""The end-to-end stage: distil the hybrid against the teacher's next-token distribution.

After the chained layer-wise stage, the converted layers are trained together, inside the whole
model, on KL(teacher || hybrid) over long windows (``e2e_seq_len``), plus an optional CE term.

- Only the converted layers' own parameters train (q_proj, o_proj, feature maps, gates, mix):
  k_proj / v_proj are the teacher's, shared and frozen, as are MLPs and norms, so folding a
  teacher KV cache into DSLA state stays exact. With ``e2e_params="dsla"`` q_proj / o_proj stay
  as they are too (a student distilled with ``train_projections=False`` then still ships no
  q/o); with ``"scalars"`` only the per-head weights of the window and the states and the
  gates' biases train (``SCALAR_PARAMS``). ``e2e_weight_lr`` gives the other parameters their
  own lr.
- One student serves every ratio the policy may pick, so each step converts the first k layers
  of the order with k drawn from ``e2e_ratios``: a layer must work whether or not the layers
  after it are converted.
- The teacher's top-k log-probabilities per position are computed once and cached on disk
  (``$DSLA_HOME/cache/e2e``); the KL uses them plus one bucket for the rest of the vocabulary.
- Mixed precision: the model may run in bfloat16 (fast on CPUs with avx512_bf16); the optimiser
  keeps float32 master copies of the trainable parameters (``MasterAdam``).
- Resumable: every ``e2e_save_every`` steps the student, the master weights and the optimiser
  state are saved (safetensors, atomically), and the step's randomness derives from the seed and
  the step number, so a resumed run continues the same sequence of steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dsla.config import SCALAR_PARAMS
from dsla.distill.artifact import COMPACT
from dsla.fileio import atomic_write
from dsla.plan import layer_count

log = logging.getLogger(__name__)

E2E_STATE = "e2e_state.safetensors"  # master weights + Adam moments of an unfinished stage


class MasterAdam:
    """Adam on float32 master copies of (possibly bfloat16) parameters.

    ``step()`` reads each parameter's gradient (skipping those without one), updates its master
    copy and writes it back in the parameter's dtype.
    """

    def __init__(self, groups: Sequence[dict], **kw: Any) -> None:
        self.params: list[nn.Parameter] = [p for g in groups for p in g["params"]]
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        it = iter(self.masters)
        self.opt = torch.optim.Adam([{**g, "params": [next(it) for _ in g["params"]]} for g in groups], **kw)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        for p, m in zip(self.params, self.masters):
            if m.grad is not None:
                p.copy_(m)

    def state_tensors(self) -> dict[str, Tensor]:
        """Master weights and Adam moments as flat named tensors (for safetensors)."""
        out = {}
        for n, m in enumerate(self.masters):
            out[f"master.{n}"] = m.detach()
            st = self.opt.state.get(m, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in st:
                    out[f"{key}.{n}"] = torch.as_tensor(st[key], dtype=torch.float32).reshape(-1)
        return out

    @torch.no_grad()
    def load_state_tensors(self, t: dict[str, Tensor]) -> None:
        for n, (p, m) in enumerate(zip(self.params, self.masters)):
            m.copy_(t[f"master.{n}"])
            p.copy_(m)
            if f"exp_avg.{n}" in t:
                self.opt.state[m] = {"step": t[f"step.{n}"].reshape(()).clone(),
                                     "exp_avg": t[f"exp_avg.{n}"].view_as(m).clone(),
                                     "exp_avg_sq": t[f"exp_avg_sq.{n}"].view_as(m).clone()}

    @property
    def param_groups(self) -> list[dict]:
        return self.opt.param_groups


def warmup_cosine(steps: int, warmup: float = 0.1) -> Callable[[int], float]:
    """lr multiplier: linear warm-up over the first ``warmup`` of the steps, then cosine to zero."""
    w = max(1, int(steps * warmup))
    return lambda s: (s + 1) / w if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / max(1, steps - w)))


def lr_multiplier(schedule: Sequence[Sequence[int]], step: int) -> float:
    """The lr multiplier at ``step`` of a stage run in segments ``[[start, total], ...]``.

    The first segment is ``warmup_cosine(total)``. A later one (a stage extended to a larger
    ``total`` after it ended) follows the cosine of the new total from where it is, warmed up
    again over its first tenth, since its Adam moments may start afresh.
    """
    start, total = [seg for seg in schedule if seg[0] <= step][-1]  # the latest segment begun by then
    value = warmup_cosine(total)(step)
    if start > 0:
        value *= min(1.0, (step - start + 1) / max(1, int(0.1 * (total - start))))
    return value


# ---- teacher top-k cache ----------------------------------------------------------------------
@torch.no_grad()
def teacher_topk(model: nn.Module, windows: Tensor, k: int, batch_size: int = 1,
                 progress: bool = False) -> tuple[Tensor, Tensor]:
    """The teacher's (all layers softmax) top-k next-token log-probs and their ids per position.

    windows (n, T) -> logp (n, T, k) float32, ids (n, T, k) int64.
    """
    lps, ids = [], []
    starts = range(0, len(windows), batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="teacher top-k", unit="batch", dynamic_ncols=True)
    for s in starts:
        logp = F.log_softmax(model(windows[s: s + batch_size]).float(), -1)  # (B, T, vocab)
        top = logp.topk(k, dim=-1)
        lps.append(top.values)
        ids.append(top.indices)
    return torch.cat(lps), torch.cat(ids)


def cached_teacher_topk(model: nn.Module, windows: Tensor, k: int, cache_dir: Path, key: dict[str, Any],
                        progress: bool = False) -> tuple[Tensor, Tensor]:
    """``teacher_topk`` of ``windows``, read from / written to ``cache_dir`` under a hash of
    ``key`` and the windows themselves (stored as float16 log-probs and int32 ids)."""
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode() + windows.numpy().tobytes()).hexdigest()[:20]
    path = Path(cache_dir) / f"topk-{h}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return t["logp"].float(), t["ids"].long()
    logp, idx = teacher_topk(model, windows, k, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({"logp": logp.half(), "ids": idx.int()}, tmp,
                                             metadata={"key": json.dumps(key, sort_keys=True)}))
    return logp.half().float(), idx


def topk_kl(student_logits: Tensor, t_logp: Tensor, t_ids: Tensor) -> Tensor:
    """Mean over positions of KL(teacher || student) on the teacher's top-k tokens plus one bucket
    holding the rest of the vocabulary. student_logits (..., vocab); t_logp, t_ids (..., k)."""
    s_logp = F.log_softmax(student_logits.float(), -1)
    s_top = s_logp.gather(-1, t_ids)  # (..., k)
    p_top = t_logp.exp()
    kl = (p_top * (t_logp - s_top)).sum(-1)
    # the bucket: p_rest log(p_rest / q_rest), each rest = 1 - (mass of the top k), clamped away from 0
    p_rest = (1 - p_top.sum(-1)).clamp_min(1e-8)
    q_rest = (1 - s_top.exp().sum(-1)).clamp_min(1e-8)
    kl = kl + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean()


def ratio_ks(ratios: Sequence[float], num_layers: int, available: int) -> list[int]:
    """The numbers of converted layers the ratios ask for (round(ratio * num_layers), as the
    server and the evaluation compute them), those the student has enough layers for."""
    ks = sorted({layer_count(r, num_layers) for r in ratios} - {0})
    return [k for k in ks if k <= available]


def trainable(mods: Sequence[nn.Module], which: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the converted layers ``mods`` that the stage trains
    (``DistillConfig.e2e_params``, validated there), in module then parameter order: every one;
    with ``which="dsla"`` all but q_proj / o_proj; with ``"scalars"`` those in ``SCALAR_PARAMS``."""
    keep = {"all": lambda n: True, "dsla": lambda n: n not in COMPACT, "scalars": lambda n: n in SCALAR_PARAMS}[which]
    return [(n, p) for m in mods for n, p in m.named_parameters() if keep(n)]


def param_groups(mods: Sequence[nn.Module], cfg) -> list[dict]:
    """Optimiser groups, each with its peak lr (``peak_lr``): one group at ``e2e_lr``, or, when
    ``e2e_weight_lr`` differs, the per-head scalars at ``e2e_lr`` then the rest at ``e2e_weight_lr``."""
    named = trainable(mods, cfg.e2e_params)
    weight_lr = cfg.e2e_weight_lr or cfg.e2e_lr
    if weight_lr == cfg.e2e_lr:  # one group, in the order runs made before the setting existed saved
        return [{"params": [p for _, p in named], "lr": cfg.e2e_lr, "peak_lr": cfg.e2e_lr}]
    groups = [{"params": [p for n, p in named if n in SCALAR_PARAMS], "lr": cfg.e2e_lr, "peak_lr": cfg.e2e_lr},
              {"params": [p for n, p in named if n not in SCALAR_PARAMS], "lr": weight_lr, "peak_lr": weight_lr}]
    return [g for g in groups if g["params"]]


# ---- the stage --------------------------------------------------------------------------------
def train_e2e(model, order: list[int], cfg, windows: Tensor, t_logp: Tensor, t_ids: Tensor,
              state_dir: Path, manifest: dict[str, Any], save: Callable[[], None],
              progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the end-to-end stage; ``manifest["e2e"]`` records its progress.

    order: the converted layers in conversion order (all distilled); windows (n, T) token
    windows with the teacher's cached top-k (n, T, k). ``save()`` writes the student and the
    manifest; it is called every ``cfg.e2e_save_every`` steps and at the end.
    """
    L = model.cfg.num_hidden_layers
    ks = ratio_ks(cfg.e2e_ratios, L, len(order))
    if not ks:
        raise ValueError(f"e2e_ratios={cfg.e2e_ratios} need more layers than the {len(order)} distilled: "
                         "distil more layers or lower the ratios")
    rec = manifest.setdefault("e2e", {"step": 0, "losses": [], "wall_time_s": 0.0})
    rec["ks"] = ks
    mods = [model.dsla[str(i)] for i in order[: max(ks)]]
    groups = param_groups(mods, cfg)
    params = [p for g in groups for p in g["params"]]
    for m in mods:  # loaded layers come with every parameter trainable: only ``params`` may get gradients
        m.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = MasterAdam(groups)
    schedule = rec.setdefault("schedule", [[0, cfg.e2e_steps]])
    if schedule[-1][1] != cfg.e2e_steps:  # extended (see dsla.distill.train.check_resumable)
        schedule.append([rec["step"], cfg.e2e_steps])
    state_path = Path(state_dir) / E2E_STATE
    if rec["step"] and state_path.is_file():
        saved = load_file(str(state_path))
        if int(saved["e2e_step"]) == rec["step"]:
            opt.load_state_tensors(saved)
            log.info("resuming the end-to-end stage at step %d", rec["step"])
        else:  # killed between the two writes: the weights follow the manifest, the moments restart
            log.warning("%s is from step %d, the manifest from step %d: resuming with fresh Adam moments",
                        state_path, int(saved["e2e_step"]), rec["step"])
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.e2e_steps, initial=rec["step"], desc="e2e", unit="step", dynamic_ncols=True)
    t_start = time.time()
    try:
        while rec["step"] < cfg.e2e_steps:
            s = rec["step"]
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 77_777 + s)
            k = ks[int(torch.randint(len(ks), (1,), generator=g))]
            w = int(s % len(windows))
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * lr_multiplier(schedule, s)
            logits = model(windows[w: w + 1], dsla_layers=order[:k])  # (1, T, vocab)
            loss = topk_kl(logits, t_logp[w: w + 1], t_ids[w: w + 1])
            if cfg.e2e_ce_weight:
                ce = F.cross_entropy(logits[0, :-1].float(), windows[w, 1:])
                loss = loss + cfg.e2e_ce_weight * ce
            opt.zero_grad()
            loss.backward()
            opt.step()
            value = loss.item()
            rec["losses"].append([k, round(value, 5)])
            rec["step"] = s + 1
            if bar is not None:
                bar.set_postfix(k=k, loss=f"{value:.4f}")
                bar.update(1)
            if rec["step"] % cfg.e2e_save_every == 0 or rec["step"] == cfg.e2e_steps:
                rec["wall_time_s"] += time.time() - t_start
                t_start = time.time()
                tensors = opt.state_tensors() | {"e2e_step": torch.tensor(rec["step"])}
                atomic_write(state_path, lambda tmp: save_file(tensors, tmp))
                save()
    finally:
        if bar is not None:
            bar.close()
        for m in mods:
            m.requires_grad_(False)
    rec["done"] = True
    save()
    state_path.unlink(missing_ok=True)
    return rec
