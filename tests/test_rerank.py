"""The cross-encoder reranker: reordering worked out by hand and scored by the judge, a tiny cross-encoder built here
trained end to end (installed, resumable, a card), evaluate/compare with --reranker, and bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import adapter.rerank as rr
from adapter.config import Config, RerankConfig
from adapter.data import load_dataset
from adapter.errors import AdapterError
from adapter.evaluate import evaluate
from adapter.pipeline import rerank_train
from adapter.systems import build_systems
from cli import main
from tests.conftest import QUESTIONS, write_dataset


class ByTable:
    """A stand-in cross-encoder scoring (question, chunk) pairs from a table; 0 for pairs not in it."""

    def __init__(self, table: dict[tuple[str, str], float]):
        self.table = table
        self.calls = 0

    def predict(self, pairs, **kw):
        self.calls += 1
        return np.array([self.table.get(tuple(p), 0.0) for p in pairs], dtype=np.float32)


def test_the_second_stage_reorders_the_top_k_only_and_keeps_first_stage_order_on_ties():
    queries = {"q": "question"}
    chunks = ["c0", "c1", "c2", "c3", "c4"]
    model = ByTable({("question", "c2"): 3.0, ("question", "c1"): 1.0})  # c0 and c3 tie at 0
    reorder = rr.ListReranker(rr.Reranker(model), queries, chunks, k=4)
    rows = np.array([[0, 1, 2, 3, 4]])
    # top 4 by score: c2 (3), c1 (1), then c0 and c3 (0) in their first-stage order; c4 is below k and stays
    assert reorder(["q"], rows).tolist() == [[2, 1, 0, 3, 4]]
    reorder(["q"], rows)
    assert model.calls == 1  # every pair was remembered: the second call predicted nothing


def test_the_judge_scores_the_reranked_list():
    # one query whose relevant chunk c2 the first stage ranks third: ndcg@10 = 1/log2(4) = 0.5; reranked first: 1.0
    corpus = np.eye(4, dtype=np.float32)
    query = np.array([[0.9, 0.5, 0.4, 0.0]], dtype=np.float32)
    query /= np.linalg.norm(query)
    qrels, cids = {"q": {"c2": 1}}, ["c0", "c1", "c2", "c3"]
    assert evaluate(query, corpus, qrels, ["q"], cids)[4]["ndcg@10"] == pytest.approx(0.5)
    reorder = rr.ListReranker(rr.Reranker(ByTable({("question", "c2"): 5.0})), {"q": "question"}, cids, k=3)
    assert evaluate(query, corpus, qrels, ["q"], cids, rerank=reorder)[4]["ndcg@10"] == pytest.approx(1.0)
    below = rr.ListReranker(rr.Reranker(ByTable({("question", "c2"): 5.0})), {"q": "question"}, cids, k=2)
    assert evaluate(query, corpus, qrels, ["q"], cids, rerank=below)[4]["ndcg@10"] == pytest.approx(0.5)


def test_hard_negatives_come_from_the_first_stage_top_k_and_are_never_relevant(tmp_path):
    ds = load_dataset(write_dataset(tmp_path / "ds", {"train": list(QUESTIONS)}))
    cids = list(ds.corpus)
    corpus = np.eye(len(cids), dtype=np.float32)
    qrels = {"q_burst": {"burst": 1}}
    query = corpus[[cids.index("burst")]] + 0.5 * corpus[[cids.index("meter")]] + 0.3 * corpus[[cids.index("lead")]]
    got = rr.mine_negatives(ds, qrels, query, corpus, k=2, n=2, seed=0)
    assert sorted(got["q_burst"]) == ["lead", "meter"]  # the top 2 non-relevant under the first stage


@pytest.fixture
def rerank_dir(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "ds", {"train": list(QUESTIONS), "test": list(QUESTIONS)})


def tiny_cfg(model_dir: Path, **over) -> Config:
    """Two epochs of batches of 4 over the tiny train questions, from the tiny BERT, first stage the tiny BERT too."""
    r = RerankConfig(**{"model": str(model_dir), "k": 4, "negatives": 2, "epochs": 2, "batch_size": 4, "lr": 1e-3,
                        "max_seq_length": 48, "val_queries": None, **over})
    return Config().replace(model=str(model_dir), val_fraction=0.3, rerank=r)


def test_rerank_train_installs_a_cross_encoder_with_a_card_that_scores_its_kept_epoch(rerank_dir, tmp_path,
                                                                                      tiny_model_dir):
    out = tmp_path / "rr"
    r = CliRunner().invoke(main, ["-q", "rerank-train", str(rerank_dir), "--out", str(out), "--model",
                                  str(tiny_model_dir), "--encoder", str(tiny_model_dir), "--rerank-k", "4",
                                  "--negatives", "2", "--epochs", "2", "--batch-size", "4", "--lr", "1e-3",
                                  "--max-seq-length", "48"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "validation ndcg@10: first stage" in r.output and f"wrote {out}" in r.output
    assert rr.is_cross_encoder(out) and not (out / "checkpoints").exists()
    meta = json.loads((out / "rerank.json").read_text())
    assert meta["start_kind"] == "encoder with a new one-logit head" and meta["val_start"] is None
    ds = load_dataset(rerank_dir)
    from adapter.data import train_val_qrels

    train, val, _ = train_val_qrels(ds, Config())
    # every train question: a row per relevant chunk, and 2 negatives (its top 4 always hold 2 non-relevant chunks)
    assert meta["rows"] == sum(len(v) for v in train.values()) + 2 * len(train)
    assert [v["epoch"] for v in meta["history"]["val"]] == [0.0, 1.0, 2.0]  # first stage alone, then each epoch
    assert meta["best_epoch"] == max(meta["history"]["val"][1:], key=lambda v: v["ndcg@10"]["32"])["epoch"]
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-ranking" in card and "first stage alone" in card and "kept epoch" in card

    # the installed weights are the kept epoch's: reranking validation again gives what that epoch scored
    reranker = rr.load_reranker(out)
    assert reranker.model.num_labels == 1
    reranker.model.max_seq_length = 48
    base = build_systems(Config().replace(model=str(tiny_model_dir)), progress=False)["base"]
    queries = base.encode_queries([ds.queries[q] for q in val])
    _, corpus = base.corpus.read(ds, base.encoder)
    again = rr.score_first_stage(ds, val, queries, corpus, rr.list_reranker(reranker, ds, 4))
    assert again["ndcg@10"] == pytest.approx(meta["val_best"]["32"]["ndcg@10"], abs=1e-6)

    # evaluate and compare score each system again with its top k reranked, by the same judge
    r = CliRunner().invoke(main, ["-q", "evaluate", str(rerank_dir), "--model", str(tiny_model_dir), "--reranker",
                                  str(out), "--rerank-k", "4", "--dims", "32", "--json", str(tmp_path / "r.json")],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    results = json.loads((tmp_path / "r.json").read_text())
    assert set(results) == {"base", "base+rerank"}
    r = CliRunner().invoke(main, ["-q", "compare", str(rerank_dir), "--base-model", str(tiny_model_dir), "--out",
                                  str(tmp_path / "rep"), "--reranker", str(out), "--rerank-k", "4", "--dims", "32",
                                  "--bootstrap", "50"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["rerank_k"] == 4 and set(summary["rerank_gain"]) == {"base+rerank"}
    assert summary["systems"]["base+rerank"]["rerank_ms"] > 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "rerank latency" in report and "Reranking: ndcg@10 over each first stage" in report


def test_a_killed_run_resumes_and_mines_its_negatives_once(rerank_dir, tmp_path, tiny_model_dir, monkeypatch):
    ds, out, cfg = load_dataset(rerank_dir), tmp_path / "rr", tiny_cfg(tiny_model_dir)
    real_clock = rr._clock_callback

    def dies_after_first_save(before):
        clock = real_clock(before)
        save = clock.on_save

        def on_save(*args, **kwargs):
            save(*args, **kwargs)
            raise RuntimeError("killed")

        clock.on_save = on_save
        return clock

    monkeypatch.setattr(rr, "_clock_callback", dies_after_first_save)
    with pytest.raises(RuntimeError, match="killed"):
        rerank_train(ds, out, cfg, progress=False)
    monkeypatch.undo()
    negatives = (out / "checkpoints" / rr.NEGATIVES_FILE).read_text()
    mined = []
    monkeypatch.setattr(rr, "mine_negatives", lambda *a, **k: mined.append(1))
    r = rerank_train(ds, out, cfg, progress=False)
    assert r.resumed_from is not None and not mined  # the negatives of the first run were read back, not mined
    meta = json.loads((out / "rerank.json").read_text())
    assert meta["resumed"] and [v["epoch"] for v in meta["history"]["val"]] == [0.0, 1.0, 2.0]
    assert json.loads(negatives)  # (the file existed and held the negatives)


def test_a_time_budget_stops_training_and_that_point_is_a_candidate(rerank_dir, tmp_path, tiny_model_dir):
    ds = load_dataset(rerank_dir)
    cfg = tiny_cfg(tiny_model_dir, max_train_seconds=1e-6)
    r = rerank_train(ds, tmp_path / "rr", cfg, progress=False)
    meta = json.loads((tmp_path / "rr" / "rerank.json").read_text())
    assert r.best_epoch < 1 and [v["epoch"] for v in meta["history"]["val"]][1:] == [r.best_epoch]


def test_bad_input_is_one_line_and_writes_nothing(rerank_dir, tmp_path, tiny_model_dir):
    def fails(*args: str) -> str:
        r = CliRunner().invoke(main, ["-q", *args])
        assert r.exit_code == 1 and r.output.startswith("Error: ") and "Traceback" not in r.output, r.output
        return r.output.strip()

    # a folder that is not a cross-encoder: a bi-encoder (sentence-transformers) folder, and an empty one
    assert "not a cross-encoder" in fails("evaluate", str(rerank_dir), "--reranker", str(tiny_model_dir))
    (tmp_path / "empty").mkdir()
    assert "not a cross-encoder" in fails("compare", str(rerank_dir), "--out", str(tmp_path / "rep"), "--reranker",
                                          str(tmp_path / "empty"))
    assert not (tmp_path / "rep").exists()
    # --rerank-k below 1, above the corpus, or without a reranker
    ce, _ = rr.start_model(str(tiny_model_dir), 48)
    ce.save(str(tmp_path / "ce"))
    assert "outside 1..6" in fails("evaluate", str(rerank_dir), "--reranker", str(tmp_path / "ce"), "--rerank-k", "0")
    assert "outside 1..6" in fails("evaluate", str(rerank_dir), "--reranker", str(tmp_path / "ce"))  # default 20
    assert "outside 1..6" in fails("rerank-train", str(rerank_dir), "--out", str(tmp_path / "o"), "--rerank-k", "7")
    assert "--rerank-k needs --reranker" in fails("evaluate", str(rerank_dir), "--rerank-k", "3")
    assert not (tmp_path / "o").exists()
    with pytest.raises(AdapterError, match="--negatives must be at least 1"):
        rerank_train(load_dataset(rerank_dir), tmp_path / "o", tiny_cfg(tiny_model_dir, negatives=0))
    assert not (tmp_path / "o").exists()


def test_the_listwise_loss_trains_too(rerank_dir, tmp_path, tiny_model_dir):
    # MultipleNegativesRankingLoss (the cross-encoder one): anchor, positive and its hard negatives as columns
    r = rerank_train(load_dataset(rerank_dir), tmp_path / "rr", tiny_cfg(tiny_model_dir, loss="mnrl", epochs=1),
                     progress=False)
    meta = json.loads((tmp_path / "rr" / "rerank.json").read_text())
    assert meta["rerank_loss"] == "mnrl" and meta["history"]["loss"]
    assert r.best_epoch == 1.0 and rr.is_cross_encoder(tmp_path / "rr")
