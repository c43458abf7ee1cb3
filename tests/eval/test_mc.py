"""Multiple-choice scoring: known answers, agreement with full forwards, formatting, the task cache."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsla.config import DSLAConfig
from dsla.data import bigbench, sources
from dsla.data.bigbench import MCExample, MCTask, parse_task
from dsla.eval.common import wilson_interval
from dsla.eval.mc import MCItem, build_items, format_example, mc_metrics, score_items
from dsla.model.loading import load_teacher


def copy_model(tiny_dir):
    """A model that predicts 'the same token again': every attention and MLP output is zeroed, so
    the logits are <norm(e_x), e_y> (tied embeddings), largest at y = x once embeddings are scaled."""
    model = load_teacher(tiny_dir)
    for block in model.model.layers:
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    model.model.embed_tokens.weight.mul_(8.0)
    return model


def test_scoring_picks_the_known_answer(tiny_dir):
    model = copy_model(tiny_dir)
    model.add_dsla([0, 2], DSLAConfig(feature_dim=8, chunk_size=8))  # o_proj copied after zeroing: DSLA adds 0 too
    g = torch.Generator().manual_seed(0)
    items = []
    for n in range(6):
        ctx = torch.randint(3, 97, (5 + n,), generator=g).tolist()
        right = (ctx[-1],) * 3
        wrong = [tuple(torch.randint(3, 97, (3,), generator=g).tolist()) for _ in range(2)]
        choices = wrong[:n % 3] + [right] + wrong[n % 3:]
        items.append(MCItem(tuple(ctx), tuple(choices), (3, 3, 3), tuple(c == right for c in choices)))
    for layers in ([], [0, 2]):
        scores = score_items(model, items, layers, max_tokens=30)
        assert mc_metrics(items, scores)["acc"] == 1.0
        assert mc_metrics(items, scores)["acc_norm"] == 1.0


@torch.no_grad()
def full_forward_scores(model, items, layers):
    out = []
    for it in items:
        row = []
        for c in it.continuations:
            ids = torch.tensor(it.context + c)
            logp = F.log_softmax(model(ids[None], dsla_layers=layers)[0].float(), -1)  # (T, vocab)
            n = len(it.context)
            row.append(float(sum(logp[n - 1 + i, t] for i, t in enumerate(c))))
        out.append(row)
    return out


@pytest.mark.parametrize("max_tokens", [1, 40, 10_000])
def test_scores_equal_full_forwards(tiny_dir, max_tokens):
    model = load_teacher(tiny_dir)
    model.add_dsla([1], DSLAConfig(feature_dim=8, chunk_size=4))
    g = torch.Generator().manual_seed(1)
    rand = lambda n: tuple(torch.randint(3, 97, (n,), generator=g).tolist())  # noqa: E731
    items = [MCItem(rand(3 + 4 * i), tuple(rand(1 + (i + j) % 4) for j in range(2 + i % 3)), (1,) * 4,
                    (True,) + (False,) * 3) for i in range(5)]
    for layers in ([], [1]):
        got = score_items(model, items, layers, max_tokens=max_tokens)
        want = full_forward_scores(model, items, layers)
        for g_row, w_row in zip(got, want):
            np.testing.assert_allclose(g_row, w_row, rtol=1e-4, atol=1e-4)


TOY = {"task_prefix": "Pick one.", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
       "examples": [{"input": f"question {i}?", "target_scores": {"right": 1, "wrong": 0, "other": 0}}
                    for i in range(30)] + [{"input": "no choices", "target": "x"}]}


def test_format_shuffles_choices_and_moves_the_space():
    task = parse_task("toy", TOY)
    assert len(task.examples) == 30 and task.examples[0].answer == 0
    ctx, conts, correct = format_example(task, task.examples[0], np.random.default_rng(3))
    assert ctx.startswith("Pick one.\nQ: question 0?\n  choice: ") and ctx.endswith("\nA:")
    assert sorted(conts) == [" other", " right", " wrong"]
    assert correct == [c == " right" for c in conts]
    firsts = {format_example(task, task.examples[0], np.random.default_rng(s))[1][0] for s in range(20)}
    assert len(firsts) == 3  # the answer is not always listed first


def test_build_items_is_reproducible_and_limited(eval_tok):
    task = parse_task("toy", TOY)
    a, b = (build_items(task, eval_tok.encode, 10, seed=5) for _ in range(2))
    assert a == b and len(a) == 10
    assert build_items(task, eval_tok.encode, 10, seed=6) != a
    assert len(build_items(task, eval_tok.encode, None, 0)) == 30


def test_metrics_and_wilson_interval():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    items = [MCItem((1,), ((2,), (3, 4)), (1, 10), (False, True)), MCItem((1,), ((2,), (3,)), (1, 1), (True, False))]
    m = mc_metrics(items, [[-1.0, -5.0], [-2.0, -1.0]])
    assert m["n"] == 2 and m["acc"] == 0.0 and m["chance"] == 0.5
    assert m["acc_norm"] == 0.5  # -5/10 beats -1/1 for the first item
    assert m["acc_ci"][0] == 0.0 and m["acc_ci"][1] > 0.5


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown multiple-choice task.*nope"):
        bigbench.check_tasks(["social_iqa", "nope"])


def test_offline_fetch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_run_pip", lambda cmd: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement bigbench==1.0.0"))
    with pytest.raises(RuntimeError, match="(?s)bigbench==1.0.0.*leave out the mc suite") as e:
        bigbench.prepare_bigbench(tmp_path)
    assert "Could not find a version" in str(e.value)
    assert not bigbench.tasks_dir(tmp_path).exists()


def test_only_used_task_files_are_extracted_and_the_sdist_dropped(tmp_path, monkeypatch):
    data = json.dumps(TOY).encode()
    monkeypatch.setattr(bigbench, "TASKS", {"toy/sub": ("toy/sub/task.json", hashlib.sha256(data).hexdigest())})
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    sdist = downloads / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        for name, blob in (("toy/sub/task.json", data), ("unused/task.json", b"{}")):
            info = tarfile.TarInfo(bigbench._PREFIX + name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    task = bigbench.load_task("toy/sub", tmp_path)
    assert isinstance(task, MCTask) and len(task.examples) == 30 and task.task_prefix == "Pick one."
    root = bigbench.tasks_dir(tmp_path)
    assert [p.relative_to(root).as_posix() for p in root.rglob("*.json")] == ["toy/sub/task.json"]
    assert not sdist.exists()
    assert bigbench.load_task("toy/sub", tmp_path) == task  # served from the cache now


def test_example_answer_ties_take_the_first():
    assert MCExample("q", ("a", "b", "c"), (0.0, 1.0, 1.0)).answer == 1
