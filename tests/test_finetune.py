"""The full Matryoshka fine-tune on the tiny BERT: the installed folder is a model that scores what its kept epoch
scored, a killed run resumes where it stopped, bad input is refused with nothing written, and 2 CPU ranks train
together under torchrun."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import adapter.finetune as ft
import adapter.st_trainer as st
from adapter.config import Config
from adapter.data import load_dataset, train_val_qrels
from adapter.encoder import load_model
from adapter.errors import AdapterError
from cli import main
from tests.conftest import tree
from tests.processes import die_after_first_save

ROOT = Path(__file__).resolve().parents[1]
DIMS = (32, 16, 8)


def tiny_cfg(model_dir: Path, **over) -> Config:
    """Two epochs of batches of 4 on the 7 tiny questions (2 held out for validation): 2 steps an epoch."""
    return Config().replace(**{"encoder.model": str(model_dir), "dims": DIMS, "select_dim": 16, "finetune.epochs": 2,
                               "finetune.batch_size": 4, "grad_accum": 1, "finetune.lr": 1e-3, "val_fraction": 0.3,
                               **over})


def test_matryoshka_dims_are_checked_and_completed():
    assert ft.matryoshka_dims(None, 384) == [384, 256, 128, 64]
    assert ft.matryoshka_dims((256, 64), 384) == [384, 256, 64]  # the full dimension is always trained
    with pytest.raises(AdapterError, match="strictly descending"):
        ft.matryoshka_dims((64, 128, 384), 384)
    with pytest.raises(AdapterError, match="above the model's dimension 384"):
        ft.matryoshka_dims((512, 256), 384)
    assert ft.select_dim(None, [384, 256, 128, 64]) == 128 and ft.select_dim(None, [32, 16]) == 32


def test_finetune_installs_a_model_that_scores_its_kept_epoch(train_dir, tmp_path, tiny_model_dir):
    out = tmp_path / "ft"
    cfg = tiny_cfg(tiny_model_dir, val_fraction=Config().split.val_fraction,  # what the command runs
                   **{"finetune.max_seq_length": 32})
    r = CliRunner().invoke(main, ["-q", "finetune", str(train_dir), "--out", str(out), "--model", str(tiny_model_dir),
                                  "--dims", "32,16,8", "--set", "finetune.select_dim=16", "--epochs", "2", "--set",
                                  "finetune.batch_size=4",
                                  "--set", "finetune.grad_accum=1", "--set", "finetune.lr=1e-3", "--set",
                                  "finetune.max_seq_length=32"],
                           catch_exceptions=False, env={"HF_HUB_OFFLINE": "1"})
    assert r.exit_code == 0, r.output
    assert "validation ndcg@10 at dim 16: base" in r.output and f"wrote {out}" in r.output
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") or p.name == "checkpoints") == []

    ds = load_dataset(train_dir)
    train, val, _ = train_val_qrels(ds, cfg)
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["dims"] == list(DIMS) and meta["select_dim"] == 16 and meta["train_seconds"] > 0
    assert meta["pairs"] == sum(len(r) for r in train.values()) and meta["val_queries"] == len(val) == 1
    assert [v["epoch"] for v in meta["history"]["val"]] == [0.0, 1.0, 2.0]  # base, then every epoch
    assert meta["history"]["loss"] and meta["max_seq_length_trained"] == 32
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_model_dir}" in card and "| 8 |" in card and f"{meta['pairs']} (question, chunk)" in card

    model = load_model(str(out))
    assert model.max_seq_length == 64  # trained at 32 tokens, saved with the base model's own length
    base = load_model(str(tiny_model_dir))
    moved = sum(float((a - b).abs().sum()) for a, b in zip(model.state_dict().values(), base.state_dict().values(),
                                                        strict=True))
    assert moved > 0
    # the installed weights are the kept epoch's: at the training length they score what that epoch scored
    model.max_seq_length = 32
    got = ft.RetrievalEvaluator(ds, val, DIMS, 16)(model)
    for d in DIMS:
        assert got[f"dim_{d}_ndcg@10"] == pytest.approx(meta["val_best"][str(d)]["ndcg@10"], abs=1e-6)
    best = max(meta["history"]["val"][1:], key=lambda v: v["ndcg@10"]["16"])
    assert meta["best_epoch"] == best["epoch"]


def test_a_killed_run_resumes_from_its_last_complete_epoch(train_dir, tmp_path, tiny_model_dir, monkeypatch):
    ds, out, cfg = load_dataset(train_dir), tmp_path / "ft", tiny_cfg(tiny_model_dir)
    die_after_first_save(ft, monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        ft.finetune(ds, out, cfg, progress=False)
    monkeypatch.undo()
    done = st.complete_checkpoints(out / st.CHECKPOINTS)
    assert len(done) == 1 and not (out / "modules.json").exists()

    calls = []
    real_call = ft.RetrievalEvaluator.__call__
    monkeypatch.setattr(ft.RetrievalEvaluator, "__call__", lambda self, *a, **k: calls.append(1) or real_call(
        self, *a, **k))
    r = ft.finetune(ds, out, cfg, progress=False)
    assert r.resumed_from == str(done[0])
    assert len(calls) == 1  # only epoch 2 was evaluated again: no base, no epoch 1
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["resumed"] and [v["epoch"] for v in meta["history"]["val"]] == [0.0, 1.0, 2.0]
    steps = [x["step"] for x in meta["history"]["loss"]]
    assert steps == sorted(set(steps)) and steps[-1] == 2 * int(done[0].name.split("-")[1])
    assert (out / "modules.json").is_file() and not (out / st.CHECKPOINTS).exists()


def test_bad_input_is_refused_and_nothing_is_written(train_dir, tmp_path, tiny_model_dir):
    ds, out = load_dataset(train_dir), tmp_path / "ft"
    for over, message in (({"dims": (8, 16, 32)}, "strictly descending"),
                          ({"dims": (64, 32)}, "above the model's dimension 32"),
                          ({"select_dim": 12}, "not one of the trained dims")):
        with pytest.raises(AdapterError, match=message):
            ft.finetune(ds, out, tiny_cfg(tiny_model_dir, **over), progress=False)
        assert not out.exists()
    not_model = tmp_path / "not-a-model"
    not_model.mkdir()
    (not_model / "notes.txt").write_text("hello")
    with pytest.raises(AdapterError, match="not a sentence-transformers model folder"):
        ft.finetune(ds, out, tiny_cfg(not_model), progress=False)
    assert not out.exists()

    holds_model = tmp_path / "holds-model"
    shutil.copytree(tiny_model_dir, holds_model)
    before = tree(holds_model)
    r = CliRunner().invoke(main, ["finetune", str(train_dir), "--out", str(holds_model), "--model",
                                  str(tiny_model_dir), "--dims", "32,16"])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "already holds a model" in r.output
    assert len(r.output.strip().splitlines()) == 1 and tree(holds_model) == before

    other_run = tmp_path / "other-run"
    (other_run / st.CHECKPOINTS).mkdir(parents=True)
    (other_run / st.CHECKPOINTS / st.RUN_FILE).write_text(json.dumps({"base_model": "another-model"}))
    before = tree(other_run)
    with pytest.raises(AdapterError, match="holds checkpoints of another fine-tune"):
        ft.finetune(ds, other_run, tiny_cfg(tiny_model_dir), progress=False)
    assert tree(other_run) == before

    with pytest.raises(AdapterError, match="is not empty"):
        ft.finetune(ds, not_model, tiny_cfg(tiny_model_dir), progress=False)
    assert tree(not_model) == {"notes.txt": hashlib.sha256(b"hello").hexdigest()}


def test_two_cpu_ranks_under_torchrun_gather_negatives_and_stay_in_sync(train_dir, tmp_path, tiny_model_dir):
    out, report = tmp_path / "ft", tmp_path / "ranks"
    report.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "ddp_worker.py"), str(train_dir), str(out), str(tiny_model_dir), str(report)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    ranks = [json.loads((report / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [x["world_size"] for x in ranks] == [2, 2] and [x["main_process"] for x in ranks] == [True, False]
    for x in ranks:  # every gather brought the other rank's batch: twice the local rows
        assert x["gathered"] and all(after == 2 * local for local, after in x["gathered"]), x["gathered"]
    assert all(x["wrapped"] and all(x["wrapped"]) for x in ranks), "the trainer did not wrap the model in DDP"
    # DDP averaged the gradients, so the replicas are identical after every step, not only after rank 1 loads back
    # the best checkpoint that rank 0 wrote
    assert len(ranks[0]["steps"]) >= 2 and ranks[0]["steps"] == ranks[1]["steps"]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["world_size"] == 2 and load_model(str(out)).get_embedding_dimension() == 32
