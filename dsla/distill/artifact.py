"""The student artifact: ``dsla.safetensors`` (DSLA parameters only) + ``manifest.json``.

Layout of the safetensors keys: ``layers.<i>.<param>`` with the DSLA module's own names
(``layers.12.q_proj.weight``, ``layers.12.history_gate.bias``...). The manifest lists the
finished layers; a layer's tensors are trusted only once the manifest names it. The weights are
written first and carry a copy of the manifest in their metadata: a run killed between the two
writes resumes from the weights' copy when it is further along (``read_manifest``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsla.config import DSLAConfig, parse_exact_groups
from dsla.fileio import atomic_write, atomic_write_json
from dsla.model.llama import HybridLM

FORMAT = "dsla-student/1"
DELTA = "_delta"  # key suffix of a parameter stored as its difference from the teacher's (compact form)
LOW_RANK = ("_delta_u", "_delta_v")  # ... or as a rank-r product of two factors, delta ~ u @ v
COMPACT = ("q_proj.weight", "o_proj.weight")  # the large parameters that start as copies of the teacher's
WEIGHTS, MANIFEST = "dsla.safetensors", "manifest.json"

log = logging.getLogger(__name__)


def _progress(m: dict[str, Any]) -> tuple[int, int, bool]:
    """How far a run's manifest is: (layers done, end-to-end steps, end-to-end done)."""
    e2e = m.get("e2e") or {}
    return len(m.get("layers_done") or []), int(e2e.get("step", 0)), bool(e2e.get("done"))


def _weights_manifest(student_dir: Path) -> dict[str, Any] | None:
    """The manifest copy in the weights' metadata (None: absent, or the file is unreadable)."""
    try:
        with safe_open(str(student_dir / WEIGHTS), "pt") as f:
            text = (f.metadata() or {}).get("manifest")
    except Exception:  # missing or corrupt: load_student reports it when it reads the tensors
        return None
    return json.loads(text) if text else None


def read_manifest(student_dir: str | Path) -> dict[str, Any]:
    p = Path(student_dir) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: {student_dir} is not a dsla student (run `dsla distill`)")
    m = json.loads(p.read_text())
    ahead = _weights_manifest(Path(student_dir))
    if ahead is not None and _progress(ahead) > _progress(m):  # killed between save_student's two writes
        log.warning("%s is behind its weights (%s against %s: layers done, end-to-end step, done): "
                    "using the weights' copy", p, _progress(m), _progress(ahead))
        m = ahead
    if m.get("format") != FORMAT:
        raise ValueError(f"{p} has format {m.get('format')!r}; this dsla reads {FORMAT!r}")
    if isinstance(m.get("config", {}).get("dsla"), dict):  # fields added later (window) take their defaults
        m["config"]["dsla"] = {**config_dict(DSLAConfig()), **m["config"]["dsla"]}
    return m


def save_student(student_dir: str | Path, model: HybridLM, manifest: dict[str, Any]) -> None:
    """Write the finished layers' DSLA parameters with a copy of the manifest in their metadata,
    then the manifest (each atomically)."""
    student_dir = Path(student_dir)
    done = manifest["layers_done"]
    tensors = {f"layers.{i}.{k}": v.detach().float().contiguous()
               for i in done for k, v in model.dsla[str(i)].state_dict().items()}
    meta = {"format": FORMAT, "manifest": json.dumps(manifest)}
    atomic_write(student_dir / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=meta))
    atomic_write_json(student_dir / MANIFEST, manifest)


def dsla_config_of(manifest: dict[str, Any]) -> DSLAConfig:
    return DSLAConfig(**manifest["config"]["dsla"])


def load_student(model: HybridLM, student_dir: str | Path, teacher_sha256: str | None = None,
                 dsla_cfg: DSLAConfig | None = None) -> dict[str, Any]:
    """Attach the student's finished DSLA layers to ``model``; return the manifest.

    Refuses a student made from another teacher (by weight hash when ``teacher_sha256`` is
    given) or whose tensors do not fit the model. ``dsla_cfg`` builds the layers with another
    config than the manifest's (``dsla distill --init-from``: another window).
    """
    student_dir = Path(student_dir)
    m = read_manifest(student_dir)
    if teacher_sha256 is not None and m["teacher"]["sha256"] != teacher_sha256:
        raise ValueError(
            f"student {student_dir} was distilled from teacher {m['teacher']['name']} "
            f"(sha256 {m['teacher']['sha256'][:12]}...) but the loaded teacher's weights hash to "
            f"{teacher_sha256[:12]}...: use the matching --teacher or distill a new student")
    done = m["layers_done"]
    cfg = dsla_cfg or dsla_config_of(m)
    try:
        sd = load_file(str(student_dir / WEIGHTS)) if done else {}
    except Exception as e:  # safetensors raises its own error type for truncated files
        raise ValueError(f"cannot read {student_dir / WEIGHTS} ({e}): the file is corrupt; re-run `dsla distill`") from None
    model.add_dsla(done, cfg)
    for i in done:
        prefix = f"layers.{i}."
        part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        teacher = model.model.layers[i].self_attn
        for k in [k for k in part if k.endswith(DELTA)]:  # compact form: teacher weight + delta
            name = k[: -len(DELTA)]
            part[name] = teacher.get_parameter(name).float() + part.pop(k).float()
        for k in [k for k in part if k.endswith(LOW_RANK)]:  # low-rank form: teacher weight + u @ v
            name = k[: -len(LOW_RANK[0])]
            if k not in part:
                continue  # taken with its other factor
            if name + LOW_RANK[0] not in part or name + LOW_RANK[1] not in part:
                raise ValueError(f"{student_dir / WEIGHTS}: layer {i} has {k} without its other factor; "
                                 "the file is incomplete: export it again")
            u, v = part.pop(name + LOW_RANK[0]), part.pop(name + LOW_RANK[1])
            part[name] = teacher.get_parameter(name).float() + u.float() @ v.float()
        for key in (m.get("compact") or {}).get("unchanged", []):  # never trained: the teacher's own
            if key.startswith(prefix):
                part[key[len(prefix):]] = teacher.get_parameter(key[len(prefix):]).detach()
        try:
            model.dsla[str(i)].load_state_dict(part, strict=True)
        except RuntimeError as e:
            raise ValueError(f"student layer {i} does not fit this teacher's shapes: {e}") from None
        model.dsla[str(i)].requires_grad_(False)  # finished: a training stage enables what it trains
    apply_exact_groups(model, m["config"].get("exact_groups", ""), done)
    return m


def apply_exact_groups(model: HybridLM, spec: str, layers=None) -> None:
    """Set the exact KV groups of the DSLA layers in ``layers`` (default: every DSLA module of
    ``model``) from ``DistillConfig.exact_groups``; a layer the spec does not name gets none."""
    groups = parse_exact_groups(spec)
    for i in model.dsla_layers() if layers is None else layers:
        model.dsla[str(i)].set_exact_groups(groups.get(int(i), ()))


def config_dict(cfg) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return json.loads(json.dumps(d))  # tuples -> lists, so it compares equal to a re-read manifest


def check_export_options(delta_rank: int | None, param_dtype: str) -> None:
    """Refuse ``export_student`` options it cannot honour (before any work)."""
    if delta_rank is not None and delta_rank < 1:
        raise ValueError(f"--delta-rank {delta_rank}: pass a positive rank, or leave it out for full differences")
    if param_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--param-dtype {param_dtype!r}: choose float32 or bfloat16")


def _without_paths(init_from: dict | None) -> dict | None:
    """An ``init_from`` record without the local paths, at every level of its chain (a run started
    from a run that was itself started ``--init-from`` another)."""
    if not init_from:
        return init_from
    out = {k: v for k, v in init_from.items() if k != "path"}
    if isinstance(out.get("init_from"), dict):
        out["init_from"] = _without_paths(out["init_from"])
    return out


def export_student(src_dir: str | Path, dst_dir: str | Path, model: HybridLM, teacher_sha256: str,
                   extra_files: tuple[str, ...] = ("report.json",), delta_rank: int | None = None,
                   param_dtype: str = "float32") -> int:
    """Write a compact copy of the student in ``src_dir`` to ``dst_dir``; return its weight bytes.

    q_proj / o_proj (most of the bytes) are stored in bfloat16: as they are when they are bfloat16
    values already (a student trained or loaded in bfloat16: exact), else as differences from the
    teacher's weights (the difference is small, so bfloat16 keeps it to ~3 significant digits, far
    finer than bfloat16 of the weight itself); a q/o never trained (difference exactly 0, e.g. layers
    distilled with ``--no-train-projections``) is not stored at all and loads as the teacher's.
    The small DSLA parameters are stored in ``param_dtype`` (float32; bfloat16 halves them and
    changes nothing for a model run in bfloat16, which rounds them so anyway). With
    ``delta_rank`` r, each difference is stored as its best rank-r approximation u @ v (SVD;
    bfloat16 factors of r x (rows + columns) values): lossy, so measure the result. ``model`` is
    the teacher the student was distilled from (checked by hash). ``extra_files`` present in
    ``src_dir`` (its eval report) are copied too.
    """
    check_export_options(delta_rank, param_dtype)
    m = load_student(model, src_dir, teacher_sha256)
    tensors, ranks, unchanged = {}, set(), []
    for i in m["layers_done"]:
        teacher = model.model.layers[i].self_attn
        for k, v in model.dsla[str(i)].state_dict().items():
            if k in COMPACT:
                delta = v.float() - teacher.get_parameter(k).float()
                if not delta.any():
                    unchanged.append(f"layers.{i}.{k}")
                    continue
                if delta_rank is None and torch.equal(v.float(), v.float().bfloat16().float()):
                    tensors[f"layers.{i}.{k}"] = v.detach().bfloat16().contiguous()  # bf16 already: as is, exact
                    ranks.add(None)
                    continue
                if delta_rank is None or delta_rank * sum(delta.shape) >= delta.numel():  # factors no smaller
                    tensors[f"layers.{i}.{k}{DELTA}"] = delta.bfloat16().contiguous()
                    ranks.add(None)
                    continue
                ranks.add(delta_rank)
                u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
                tensors[f"layers.{i}.{k}{LOW_RANK[0]}"] = (u[:, :delta_rank] * sv[:delta_rank]).bfloat16().contiguous()
                tensors[f"layers.{i}.{k}{LOW_RANK[1]}"] = vh[:delta_rank].bfloat16().contiguous()
            else:
                tensors[f"layers.{i}.{k}"] = v.detach().to(getattr(torch, param_dtype)).contiguous()
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    atomic_write(dst / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT, "compact": "1"}))
    manifest = {k: v for k, v in m.items() if k not in ("e2e",)} | {
        "e2e": {k: v for k, v in m.get("e2e", {}).items() if k != "losses"} or None,
        "compact": {"delta_dtype": "bfloat16", "delta_params": list(COMPACT),
                    "delta_rank": delta_rank if ranks == {delta_rank} else None,  # None: some or all in full
                    "unchanged": unchanged, "param_dtype": param_dtype}}
    manifest["teacher"] = {k: v for k, v in m["teacher"].items() if k != "path"}
    manifest["init_from"] = _without_paths(manifest.get("init_from"))  # a local path means nothing elsewhere
    for name in extra_files:
        if (Path(src_dir) / name).is_file():
            atomic_write(dst / name, lambda tmp, n=name: Path(tmp).write_bytes((Path(src_dir) / n).read_bytes()))
    atomic_write_json(dst / MANIFEST, manifest)
    return (dst / WEIGHTS).stat().st_size
