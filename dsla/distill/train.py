"""Chained layer-wise distillation of attention layers into DSLA (the paper's fine-tuning scheme).

For each layer in the sensitivity order, inside the model that already runs the earlier layers
as DSLA:
  1. collect that layer's attention inputs and the teacher attention's outputs on training
     windows (frozen forward through the partially converted model);
  2. train the layer's DSLA parameters to reproduce those outputs (normalised MSE of the layer
     output after o_proj, q_proj/o_proj trainable; or per head with only the DSLA-specific
     parameters: feature maps, gates, mix);
  3. optionally, a short per-layer KL stage: KL(teacher logits || hybrid logits), only this
     layer's DSLA parameters trainable;
  4. save the artifact atomically (a killed run resumes after the last finished layer).
Then the end-to-end stage over all converted layers at once (``dsla.distill.e2e``), on by default.
Everything random derives from ``cfg.seed`` and the layer index, so resuming reproduces an
uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dsla.config import DistillConfig, format_exact_groups, parse_exact_groups
from dsla.distill.e2e import MasterAdam, cached_teacher_topk, train_e2e, warmup_cosine
from dsla.data.atomic import sha256_file
from dsla.distill.artifact import (FORMAT, WEIGHTS, apply_exact_groups, config_dict, dsla_config_of, load_student,
                                  read_manifest, save_student)
from dsla.distill.rank import attention_entropy, order_from_scores
from dsla.model.llama import HybridLM, split_heads
from dsla.ops.attention import causal_attention
from dsla.ops.rope import apply_rope

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the layer of interest has run."""


@torch.no_grad()
def collect_layer_io(model: HybridLM, layer: int, windows: Tensor, dsla_layers: list[int],
                     batch_size: int) -> dict[str, Tensor]:
    """What ``layer``'s attention sees and produces on ``windows`` (n, T), earlier layers converted.

    Returns x (n, T, hidden), the attention input (after the block's norm); k_raw / k
    (n, Hkv, T, D) before / after RoPE; v (n, Hkv, T, D); the teacher's per-head attention output
    o (n, Hq, T, D) and the layer's output after o_proj y (n, T, hidden); and the RoPE tables
    cos / sin (T, D) of positions 0..T-1. All float32.
    """
    parts: dict[str, list[Tensor]] = {name: [] for name in ("x", "k_raw", "k", "v", "o", "y")}
    tables: dict[str, Tensor] = {}
    attn = model.model.layers[layer].self_attn
    Hq = model.cfg.num_attention_heads

    def hook(module, args):
        x, cos, sin, seq_lens = args[:4]
        B, T = len(seq_lens), seq_lens[0]
        batch = lambda t: t.view(t.shape[0], B, T, -1).transpose(0, 1)  # noqa: E731  (H, N, D) -> (B, H, T, D)
        q = batch(apply_rope(split_heads(module.q_proj(x), Hq), cos, sin))
        k_raw, k, v = (batch(t) for t in module.project_kv(x, cos, sin))
        o = causal_attention(q, k, v)  # (B, Hq, T, D)
        y = module.o_proj(o.transpose(1, 2).reshape(B, T, -1))  # (B, T, hidden)
        for name, t in zip(parts, (x.view(B, T, -1), k_raw, k, v, o, y)):
            parts[name].append(t.float())
        tables["cos"], tables["sin"] = cos[:T].float(), sin[:T].float()
        raise _Stop

    handle = attn.register_forward_pre_hook(hook)
    try:
        for s in range(0, len(windows), batch_size):
            w = windows[s: s + batch_size]
            try:
                model.hidden_states(w.reshape(-1), [w.shape[1]] * len(w), None, dsla_layers)
            except _Stop:
                pass
    finally:
        handle.remove()
    return {**{name: torch.cat(ts) for name, ts in parts.items()}, **tables}


def normalized_mse(pred: Tensor, target: Tensor) -> Tensor:
    return (pred.float() - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def layer_seed(cfg: DistillConfig, layer: int, salt: int) -> int:
    return cfg.seed * 1_000_003 + (layer + 1) * 101 + salt  # layer -1 (ranking) stays >= 0


def attend_batch(mod, io: dict[str, Tensor], idx: Tensor) -> Tensor:
    """The DSLA layer's per-head output for the windows ``idx``, (Hq, N, D).

    q is recomputed from the stored attention input with the DSLA layer's own q_proj, so a
    trainable q_proj gets its gradient.
    """
    B, T = len(idx), io["x"].shape[1]
    dt = mod.q_proj.weight.dtype
    x = io["x"][idx].reshape(B * T, -1).to(dt)  # (N, hidden)
    cos, sin = io["cos"].repeat(B, 1), io["sin"].repeat(B, 1)  # (N, D)
    q = apply_rope(split_heads(mod.q_proj(x), mod.lcfg.num_attention_heads), cos, sin)  # (Hq, N, D)
    return mod.attend(q, *(heads(io[n], idx).to(dt) for n in ("k_raw", "k", "v")), [T] * B, None)


def heads(t: Tensor, idx: Tensor) -> Tensor:
    """Windows ``idx`` of a stored (n, H, T, D) tensor, flattened to (H, N, D)."""
    return t[idx].transpose(0, 1).reshape(t.shape[1], -1, t.shape[-1])


def stage1_loss(mod, out: Tensor, io: dict[str, Tensor], idx: Tensor, on_output: bool) -> Tensor:
    """Normalised MSE against the teacher per head (Hq, N, D), or of the layer output after o_proj."""
    if not on_output:
        return normalized_mse(out, heads(io["o"], idx))
    merged = out.transpose(0, 1).reshape(out.shape[1], -1)  # (Hq, N, D) -> (N, Hq*D)
    y_target = io["y"][idx].reshape(merged.shape[0], -1)  # (N, hidden)
    return normalized_mse(mod.o_proj(merged.to(mod.o_proj.weight.dtype)), y_target)


def train_attention_stage(model: HybridLM, layer: int, io: dict[str, Tensor], cfg: DistillConfig,
                          on_step: Callable[[float], None] | None = None) -> list[float]:
    """Fit ``layer``'s DSLA layer to the teacher attention on stored inputs (stage 1).

    The feature maps, gates and mix always train (lr ``cfg.lr``); with ``cfg.train_projections``
    q_proj and o_proj train too (lr ``cfg.proj_lr``) and the loss is on the layer's output after
    o_proj, the quantity the residual stream sees. The teacher's k/v are fixed inputs, so a step
    costs one small layer, not the model.
    """
    mod = model.dsla[str(layer)].requires_grad_(True)
    proj = ("q_proj", "o_proj")
    small = [p for n, p in mod.named_parameters() if not n.startswith(proj)]
    if not cfg.train_projections:
        mod.q_proj.requires_grad_(False)
        mod.o_proj.requires_grad_(False)
    groups = [{"params": small, "lr": cfg.lr}]
    if cfg.train_projections:
        groups.append({"params": [p for n, p in mod.named_parameters() if n.startswith(proj)], "lr": cfg.proj_lr})
    opt = MasterAdam(groups)  # float32 master weights: the model may run in bfloat16
    sched = warmup_cosine(cfg.attn_steps)
    peak = [g["lr"] for g in opt.param_groups]
    n = io["x"].shape[0]
    g = torch.Generator().manual_seed(layer_seed(cfg, layer, 1))
    losses: list[float] = []
    while len(losses) < cfg.attn_steps:
        perm = torch.randperm(n, generator=g)  # a fresh pass over the windows
        for s in range(0, n, cfg.batch_size):
            if len(losses) == cfg.attn_steps:
                break
            idx = perm[s: s + cfg.batch_size]
            for group, lr in zip(opt.param_groups, peak):
                group["lr"] = lr * sched(len(losses))
            loss = stage1_loss(mod, attend_batch(mod, io, idx), io, idx, cfg.train_projections)
            opt.zero_grad()
            if loss.requires_grad:  # not when every KV group is exact and q/o are not trained: nothing to learn
                loss.backward()
                opt.step()
            losses.append(loss.item())
            if on_step:
                on_step(losses[-1])
    return losses


@torch.no_grad()
def eval_attention_stage(model: HybridLM, layer: int, io: dict[str, Tensor], on_output: bool) -> float:
    """The stage-1 objective on held-out windows."""
    mod = model.dsla[str(layer)]
    idx = torch.arange(io["x"].shape[0])
    return float(stage1_loss(mod, attend_batch(mod, io, idx), io, idx, on_output))


def train_layer_kl_stage(model: HybridLM, layer: int, windows: Tensor, dsla_layers: list[int],
                         cfg: DistillConfig, on_step: Callable[[float], None] | None = None) -> list[float]:
    """KL(teacher || hybrid) on next-token distributions; only this layer's DSLA params move."""
    mod = model.dsla[str(layer)].requires_grad_(True)
    opt = MasterAdam([{"params": list(mod.parameters()), "lr": cfg.e2e_lr}])
    losses = []
    for s in range(0, len(windows), cfg.batch_size):
        w = windows[s: s + cfg.batch_size]
        with torch.no_grad():
            teacher_logp = F.log_softmax(model(w).float(), -1)
        student_logp = F.log_softmax(model(w, dsla_layers=dsla_layers).float(), -1)
        loss = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1).mean()
        opt.zero_grad()
        if loss.requires_grad:  # as in train_attention_stage
            loss.backward()
            opt.step()
        losses.append(loss.item())
        if on_step:
            on_step(losses[-1])
    return losses


def new_manifest(teacher_dir: Path, teacher_sha: str, cfg: DistillConfig) -> dict[str, Any]:
    return {"format": FORMAT, "teacher": {"name": teacher_dir.name, "path": str(teacher_dir), "sha256": teacher_sha},
            "config": config_dict(cfg), "ranking": None, "order": None, "layers_done": [], "metrics": {},
            "wall_time_s": 0.0}


def check_init_from(src: Path, cfg: DistillConfig, max_layers: int | None = None) -> dict[str, Any]:
    """The manifest of ``src`` if a run with ``cfg`` may start from it (see ``start_from``)."""
    m = read_manifest(src)
    old = dsla_config_of(m)
    diff = [f.name for f in dataclasses.fields(old)
            if f.name not in ("window", "sinks") and getattr(old, f.name) != getattr(cfg.dsla, f.name)]
    if diff:
        raise ValueError(f"--init-from {src}: its DSLA layers have other {', '.join(diff)} "
                         f"({', '.join(f'{k}={getattr(old, k)}' for k in diff)}); only --window and --sinks may differ")
    if (old.window == 0) != (cfg.dsla.window == 0):
        raise ValueError(f"--init-from {src}: window {old.window} -> {cfg.dsla.window} adds or drops the window's "
                         "parameters; both windows must be nonzero (or both 0)")
    if cfg.order != "given" or list(cfg.layers) != m["order"]:
        raise ValueError(f"--init-from {src}: the order comes from the source; pass --order given "
                         f"--layers {','.join(map(str, m['order']))}")
    done, e2e = len(m["layers_done"]), m.get("e2e") or {}
    if not done:
        raise ValueError(f"--init-from {src}: it has no finished layers to start from")
    if m["config"].get("e2e_steps") and not e2e.get("done"):
        raise ValueError(f"--init-from {src}: its end-to-end stage stopped at step {e2e.get('step', 0)} of "
                         f"{m['config']['e2e_steps']}; finish it first (`dsla distill --out {src}` with its settings)")
    had, now = parse_exact_groups(m["config"].get("exact_groups", "")), parse_exact_groups(cfg.exact_groups)
    dropped = {i: tuple(g for g in gs if g not in now.get(i, ())) for i, gs in had.items()}
    if any(dropped.values()):  # those heads were never trained as DSLA (an exact head's DSLA weights get no gradient)
        raise ValueError(f"--init-from {src}: it keeps KV groups {format_exact_groups(dropped)} exact, and their "
                         f"DSLA weights were never trained: keep them in --exact-groups (it has "
                         f"{m['config'].get('exact_groups')!r})")
    if max_layers is not None and max_layers < done:
        raise ValueError(f"--max-layers {max_layers} is below the {done} layers --init-from {src} has done; "
                         f"pass --max-layers {done} or more")
    return m


def start_from(model: HybridLM, src: Path, out_dir: Path, teacher_dir: Path, teacher_sha: str,
               cfg: DistillConfig, max_layers: int | None = None) -> dict[str, Any]:
    """A new run in ``out_dir`` that starts from the finished student ``src``: its order, its
    layers done and their weights (end-to-end stage included) are taken as they are, built with
    ``cfg.dsla``, which may differ from the source's in the window only (both nonzero: a window
    adds a parameter). Later layers (``max_layers``) and the end-to-end stage then run as in any
    run; ``manifest["init_from"]`` records the source, its config and its end-to-end stage."""
    src = Path(src).resolve()
    m = check_init_from(src, cfg, max_layers)
    load_student(model, src, teacher_sha, dsla_cfg=cfg.dsla)
    manifest = new_manifest(teacher_dir, teacher_sha, cfg)
    for k in ("ranking", "order", "layers_done", "metrics", "wall_time_s"):
        manifest[k] = m[k]
    manifest["init_from"] = {
        "path": str(src), "weights_sha256": sha256_file(src / WEIGHTS), "config": m["config"],
        "e2e": {k: v for k, v in (m.get("e2e") or {}).items() if k != "losses"} or None,
        "init_from": m.get("init_from")}
    save_student(out_dir, model, manifest)
    log.info("%s starts from %s: %d layers, window %d -> %d", out_dir, src, len(m["layers_done"]),
             m["config"]["dsla"]["window"], cfg.dsla.window)
    return manifest


def open_run(model: HybridLM, teacher_dir: Path, teacher_sha: str, out_dir: Path, cfg: DistillConfig,
             max_layers: int | None, init_from: Path | None) -> dict[str, Any]:
    """The manifest of the run in ``out_dir``: resumed (its layers loaded), started from
    ``init_from``, or new."""
    if (out_dir / "manifest.json").exists():
        manifest = read_manifest(out_dir)
        source = (manifest.get("init_from") or {}).get("path")
        if init_from is not None and source != str(Path(init_from).resolve()):
            raise ValueError(f"{out_dir} holds a run {'started from ' + source if source else 'of its own'}, not "
                             f"from --init-from {init_from}: resume it without --init-from, or choose another --out")
        check_resumable(out_dir, manifest, cfg)
        load_student(model, out_dir, teacher_sha)
        log.info("resuming %s: %d layers already done", out_dir, len(manifest["layers_done"]))
        return manifest
    if init_from is not None:
        return start_from(model, Path(init_from), out_dir, teacher_dir, teacher_sha, cfg, max_layers)
    return new_manifest(teacher_dir, teacher_sha, cfg)


def distill(model: HybridLM, teacher_dir: Path, teacher_sha: str, out_dir: Path, cfg: DistillConfig,
            train_windows: Callable[[int, int], Tensor], val_windows: Callable[[int, int], Tensor],
            max_layers: int | None = None, progress: bool = True,
            e2e_windows: Callable[[int, int], Tensor] | None = None,
            init_from: Path | None = None) -> dict[str, Any]:
    """Run (or resume) chained distillation, then the end-to-end stage, into ``out_dir``; return
    the manifest.

    train_windows(num, seed) / val_windows(num, seed) give (num, cfg.seq_len) token windows;
    e2e_windows(num, seed) gives (num, cfg.e2e_seq_len) windows (default: train_windows).
    ``max_layers`` stops the layer-wise stage after that many finished layers in total (for
    partial artifacts); the end-to-end stage then trains the layers done. ``init_from``: a new
    run starts from that student (see ``start_from``).
    """
    out_dir = Path(out_dir)
    manifest = open_run(model, teacher_dir, teacher_sha, out_dir, cfg, max_layers, init_from)
    if manifest["order"] is None:
        manifest["ranking"], manifest["order"] = rank_layers(model, cfg, train_windows, progress)
    order: list[int] = manifest["order"]
    exact = parse_exact_groups(cfg.exact_groups)
    stray = sorted(set(exact) - set(order))
    if stray:
        raise ValueError(f"--exact-groups names layers {stray} that are not in the order {order}: "
                         "exact groups go in layers that the student converts")
    H = model.cfg.num_key_value_heads
    if any(g >= H for gs in exact.values() for g in gs):
        raise ValueError(f"--exact-groups {cfg.exact_groups!r}: a group is out of range; the model has {H} KV "
                         f"heads per layer (groups 0..{H - 1})")
    apply_exact_groups(model, cfg.exact_groups)  # over what a resumed or --init-from student had
    todo = [i for i in order if i not in manifest["layers_done"]]
    if max_layers is not None:
        todo = todo[: max(0, max_layers - len(manifest["layers_done"]))]
    bar = None
    if progress:
        from tqdm import tqdm
        steps = len(todo) * (cfg.attn_steps + -(-cfg.layer_kl_sequences // cfg.batch_size))
        bar = tqdm(total=steps, desc="distill", unit="step", dynamic_ncols=True)
    try:
        for layer in todo:
            t0 = time.time()
            done = list(manifest["layers_done"])
            torch.manual_seed(layer_seed(cfg, layer, 0))
            model.add_dsla([layer], cfg.dsla)
            apply_exact_groups(model, cfg.exact_groups)
            io = collect_layer_io(model, layer, train_windows(cfg.attn_sequences, layer_seed(cfg, layer, 2)),
                                  done, cfg.batch_size)
            io_val = collect_layer_io(model, layer, val_windows(cfg.val_sequences, layer_seed(cfg, layer, 3)),
                                      done, cfg.batch_size) if cfg.val_sequences else None
            val_before = eval_attention_stage(model, layer, io_val, cfg.train_projections) if io_val else None

            def on_step(loss: float, stage: str = "attn") -> None:
                if bar is not None:
                    bar.set_postfix(layer=layer, stage=stage, loss=f"{loss:.4f}")
                    bar.update(1)

            with torch.enable_grad():
                attn_losses = train_attention_stage(model, layer, io, cfg, on_step)
                val_after = eval_attention_stage(model, layer, io_val, cfg.train_projections) if io_val else None
                del io, io_val
                kl_losses = []
                if cfg.layer_kl_sequences:
                    kl_losses = train_layer_kl_stage(
                        model, layer, train_windows(cfg.layer_kl_sequences, layer_seed(cfg, layer, 4)),
                        done + [layer], cfg, lambda v: on_step(v, "kl"))
            model.dsla[str(layer)].requires_grad_(False)
            elapsed = time.time() - t0
            manifest["layers_done"] = done + [layer]
            manifest["metrics"][str(layer)] = {
                "position": len(done), "attn_train_loss_first": attn_losses[0], "attn_train_loss_last": attn_losses[-1],
                "attn_val_nmse_before": val_before, "attn_val_nmse_after": val_after,
                "kl_first": kl_losses[0] if kl_losses else None, "kl_last": kl_losses[-1] if kl_losses else None,
                "tokens_attn": cfg.attn_sequences * cfg.seq_len, "steps_attn": cfg.attn_steps,
                "tokens_layer_kl": cfg.layer_kl_sequences * cfg.seq_len, "wall_time_s": elapsed}
            manifest["wall_time_s"] += elapsed
            save_student(out_dir, model, manifest)
            log.info("layer %d done (%d/%d): val nmse %.4f -> %.4f in %.1fs", layer, len(done) + 1, len(order),
                     val_before or float("nan"), val_after or float("nan"), elapsed)
    finally:
        if bar is not None:
            bar.close()
    if cfg.e2e_steps and manifest["layers_done"]:
        end_to_end(model, out_dir, cfg, manifest, e2e_windows or train_windows, progress)
    return manifest


def check_resumable(out_dir: Path, manifest: dict[str, Any], cfg: DistillConfig) -> None:
    """Refuse to resume ``out_dir`` with another config, except another ``e2e_steps``: a stage
    that has run (or finished) continues from where it is to the new count (see
    ``dsla.distill.e2e.lr_multiplier``; ``end_to_end`` refuses a count below the steps done);
    the manifest then records the new count."""
    old, new = dict(manifest["config"]), config_dict(cfg)
    # A top-level setting added since the run began takes its default, which every new setting must
    # keep equal to the behaviour from before it existed; the manifest then records it.
    for k, v in config_dict(DistillConfig()).items():
        old.setdefault(k, v)
    steps = (old.pop("e2e_steps"), new.pop("e2e_steps"))
    if old != new:
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise ValueError(f"{out_dir} holds a distillation run with a different config ({', '.join(diff)}); "
                         "resume it with the same settings, or choose another --out")
    rec = manifest.get("e2e")
    if rec is not None and steps[0] != steps[1] and "schedule" not in rec:  # from before schedules were kept
        rec["schedule"] = [[0, rec["step"] if rec.get("done") else steps[0]]]
    manifest["config"] = config_dict(cfg)  # equal but for e2e_steps (the new count) and settings added since


def end_to_end(model: HybridLM, out_dir: Path, cfg: DistillConfig, manifest: dict[str, Any],
               windows_fn: Callable[[int, int], Tensor], progress: bool) -> None:
    """The end-to-end stage over the layers done, in their order (skipped when already done for
    exactly these layers; restarted when the layer-wise stage has added layers since)."""
    layers = [i for i in manifest["order"] if i in manifest["layers_done"]]
    rec = manifest.get("e2e")
    if rec is not None and rec.get("layers") != layers:
        manifest.pop("e2e")
        rec = None
    if rec is not None and cfg.e2e_steps < rec["step"]:
        raise ValueError(f"{out_dir} has already run {rec['step']} end-to-end steps; --e2e-steps {cfg.e2e_steps} "
                         f"would undo them: pass --e2e-steps {rec['step']} or more, or choose another --out")
    if rec is not None and rec.get("done"):
        if rec["step"] == cfg.e2e_steps:
            return
        log.info("extending the end-to-end stage from %d to %d steps", rec["step"], cfg.e2e_steps)
        rec.setdefault("schedule", [[0, rec["step"]]])  # a finished stage from before schedules were recorded
        rec["schedule"].append([rec["step"], cfg.e2e_steps])
        rec["done"] = False
    windows = windows_fn(cfg.e2e_windows, layer_seed(cfg, -1, 8))
    from dsla.paths import dsla_home
    key = {"teacher": manifest["teacher"]["sha256"], "topk": cfg.e2e_topk,
           "dtype": str(model.model.embed_tokens.weight.dtype)}
    t_logp, t_ids = cached_teacher_topk(model, windows, cfg.e2e_topk, dsla_home() / "cache" / "e2e", key, progress)
    rec = manifest.setdefault("e2e", {"step": 0, "losses": [], "wall_time_s": 0.0})
    if rec["step"] == 0:  # the layer-wise student as it was, for ablations (`dsla eval --student DIR/stage1`)
        save_student(out_dir / "stage1", model, {k: v for k, v in manifest.items() if k != "e2e"})
    rec["layers"] = layers
    train_e2e(model, layers, cfg, windows, t_logp, t_ids, out_dir, manifest,
              lambda: save_student(out_dir, model, manifest), progress)


def rank_layers(model: HybridLM, cfg: DistillConfig, train_windows: Callable[[int, int], Tensor],
                progress: bool) -> tuple[dict[str, Any], list[int]]:
    """The order to convert layers in, with the scores it came from."""
    if cfg.order == "given":
        return {"metric": "given", "scores": None}, list(cfg.layers)
    windows = train_windows(cfg.rank_sequences, layer_seed(cfg, -1, 5))
    scores = attention_entropy(model, windows, cfg.batch_size // 2 or 1, progress)
    order = order_from_scores(scores, cfg.order)
    if cfg.layers:  # restrict to the listed layers, keeping the ranking's order
        order = [i for i in order if i in set(cfg.layers)]
    return {"metric": "entropy", "scores": scores}, order
