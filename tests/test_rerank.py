"""The cross-encoder reranker: reordering worked out by hand and scored by the judge, a tiny cross-encoder built here
trained end to end (installed, resumable, a card), evaluate/compare with --reranker, and bad input in one line."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import adapter.rerank as rr
import adapter.rerank_train as rt
from adapter.config import Config, RerankConfig
from adapter.data import load_dataset
from adapter.errors import AdapterError
from adapter.evaluate import evaluate
from adapter.pipeline import rerank_train
from adapter.systems import build_systems
from cli import main
from tests.processes import die_after_first_save


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
    assert reorder(["q"], rows, np.zeros((1, 5))).tolist() == [[2, 1, 0, 3, 4]]
    reorder(["q"], rows, np.zeros((1, 5)))
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


def test_fusion_weighs_the_first_stage_score_and_a_large_weight_keeps_its_order():
    queries, chunks = {"q": "question"}, ["c0", "c1", "c2", "c3"]
    # reranker scores 0, 1, 4, 3 down the first stage's list (standardised -1.26, -0.63, 1.26, 0.63); first-stage
    # scores 0.9, 0.8, 0.5, 0.4 (standardised 1.21, 0.73, -0.73, -1.21)
    model = ByTable({("question", "c0"): 0.0, ("question", "c1"): 1.0, ("question", "c2"): 4.0,
                     ("question", "c3"): 3.0})
    rows, first = np.array([[0, 1, 2, 3]]), np.array([[0.9, 0.8, 0.5, 0.4]])
    reranker = rr.Reranker(model)
    assert rr.ListReranker(reranker, queries, chunks, k=4)(["q"], rows, first).tolist() == [[2, 3, 1, 0]]
    # weight 1: c0 -0.05, c1 0.10, c2 0.54, c3 -0.58 -> c2, c1, c0, c3
    fused = rr.ListReranker(reranker, queries, chunks, k=4, fusion=1.0)
    assert fused(["q"], rows, first).tolist() == [[2, 1, 0, 3]]
    assert rr.ListReranker(reranker, queries, chunks, k=4, fusion=100.0)(["q"], rows, first).tolist() == [[0, 1, 2, 3]]
    reranker.fusion = 1.0  # the reranker's own weight (from its rerank.json) is the default
    assert rr.ListReranker(reranker, queries, chunks, k=4)(["q"], rows, first).tolist() == [[2, 1, 0, 3]]
    with pytest.raises(ValueError, match="first stage's scores"):
        fused(["q"], rows)


def test_each_first_stage_gets_the_fusion_weight_chosen_on_its_own_lists(tmp_path):
    adapter = tmp_path / "a.safetensors"
    adapter.write_bytes(b"some adapter")
    key = f"adapter:{rr.file_sha(adapter)}"
    assert rr.stage_key("base", "m") == "base:m" and rr.stage_key("adapter", str(adapter)) == key
    assert rr.stage_key("adapter", str(tmp_path / "gone")) is None
    reranker = rr.Reranker(ByTable({("question", "c0"): 1.0}), fusion=1.0, weights={"base:m": 2.0, key: 8.0})
    base, adapted = reranker.for_first_stage("base", "m"), reranker.for_first_stage("adapter", str(adapter))
    assert (base.fusion, adapted.fusion, reranker.fusion) == (2.0, 8.0, 1.0)
    assert base.model is reranker.model and base._memo is reranker._memo  # one model, one memory of scores
    assert reranker.for_first_stage("fine-tune", "ft") is reranker  # not validated: the training stage's weight
    base.scores([("question", "c0")])
    assert reranker._memo == {("question", "c0"): 1.0}


def test_the_cosine_head_scores_question_tokens_against_chunk_tokens():
    import torch

    # two pairs of 4 tokens: [q, q, c, pad] and [q, c, c, c]; token states chosen so the cosines are worked out
    h = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [9.0, 9.0]],
                      [[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    f = {"token_embeddings": h, "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
         "token_type_ids": torch.tensor([[0, 0, 1, 0], [0, 1, 1, 1]])}
    got = rr.CosineHead(scale=2.0)(f)["scores"].squeeze(1)
    assert got.tolist() == pytest.approx([2.0 * 2 ** -0.5, 0.0], abs=1e-6)  # (1,0).(1,1)/sqrt2; (0,1).(1,0)


def test_the_prior_loss_is_lambda_loss_on_the_score_plus_the_weighted_first_stage_prior(train_test_dir, tiny_model_dir):
    import torch
    from sentence_transformers.cross_encoder.losses import LambdaLoss

    model, _ = rr.start_model(str(tiny_model_dir), 48)
    queries, docs = ["burst pipe", "meter"], [["a burst main", "the meter", "lead"], ["meter reading", "pipe"]]
    labels, priors = [torch.tensor([1, 0, 0]), torch.tensor([1, 0])], [[0.5, 2.0, -1.0], [-1.5, 1.0]]
    flat = torch.tensor([p for row in priors for p in row])
    with torch.no_grad():
        got = rt.prior_lambda_loss(model, 3.0, 32)([queries, docs, priors], labels)
        plain = LambdaLoss(model, mini_batch_size=32, activation_fn=Shifted(3.0 * flat))([queries, docs], labels)
        zero = rt.prior_lambda_loss(model, 0.0, 32)([queries, docs, priors], labels)
        assert float(got) == pytest.approx(float(plain), rel=1e-5)
        assert float(zero) == pytest.approx(float(LambdaLoss(model, mini_batch_size=32)([queries, docs], labels)),
                                            rel=1e-5)
        assert float(got) != pytest.approx(float(zero), rel=1e-3)  # the prior moves the loss


class Shifted:  # a hand-made activation: the scores in pair order, shifted
    def __init__(self, add):
        self.add = add

    def __call__(self, x):
        return x + self.add


def test_priors_are_first_stage_scores_standardised_over_the_top_k(train_dir):
    ds = load_dataset(train_dir)
    cids = list(ds.corpus)
    corpus = np.eye(len(cids), dtype=np.float32)
    query = np.zeros((1, len(cids)), np.float32)
    query[0, :3] = [0.9, 0.6, 0.3]  # top 3 scores 0.9, 0.6, 0.3: mean 0.6, spread sqrt(0.06)
    got = rt.first_stage_priors(ds, {"q": {cids[0]: 1}}, query, corpus, {"q": [cids[0], cids[2], cids[5]]}, k=3)
    sd = 0.06 ** 0.5
    assert got["q"] == pytest.approx({cids[0]: 0.3 / sd, cids[2]: -0.3 / sd, cids[5]: -0.6 / sd}, rel=1e-5)


def test_hard_negatives_come_from_the_first_stage_top_k_and_are_never_relevant(train_dir):
    ds = load_dataset(train_dir)
    cids = list(ds.corpus)
    corpus = np.eye(len(cids), dtype=np.float32)
    qrels = {"q_burst": {"burst": 1}}
    query = corpus[[cids.index("burst")]] + 0.5 * corpus[[cids.index("meter")]] + 0.3 * corpus[[cids.index("lead")]]
    got = rt.mine_negatives(ds, qrels, query, corpus, k=2, n=2, seed=0)
    assert sorted(got["q_burst"]) == ["lead", "meter"]  # the top 2 non-relevant under the first stage


def tiny_cfg(model_dir: Path, **over) -> Config:
    """Two epochs of batches of 4 over the tiny train questions, from the tiny BERT, first stage the tiny BERT too."""
    r = RerankConfig(**{"model": str(model_dir), "k": 4, "negatives": 2, "epochs": 2, "batch_size": 4, "lr": 1e-3,
                        "max_seq_length": 48, "val_queries": None, **over})
    return Config().replace(encoder={"model": str(model_dir)}, val_fraction=0.3, rerank=r)


def test_rerank_train_installs_a_cross_encoder_with_a_card_that_scores_its_kept_epoch(train_test_dir, tmp_path,
                                                                                      tiny_model_dir, monkeypatch):
    import huggingface_hub
    import torch

    calls = {}  # the Hub is replaced, as in test_export's push test: what it was given is checked
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.setdefault("create", (repo_id, self.token)) and
                        f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw))
    out = tmp_path / "rr"
    r = CliRunner().invoke(main, ["-q", "rerank-train", str(train_test_dir), "--out", str(out), "--model",
                                  str(tiny_model_dir), "--encoder", str(tiny_model_dir), "--set", "rerank.k=4",
                                  "--set", "rerank.negatives=2", "--epochs", "2", "--set", "rerank.batch_size=4",
                                  "--set", "rerank.lr=1e-3",
                                  "--set", "rerank.max_seq_length=48", "--set", "rerank.prior=2", "--push-to-hub",
                                  "me/rr"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "validation ndcg@10: first stage" in r.output and f"wrote {out}" in r.output
    assert "pushed" in r.output and "https://huggingface.co/me/rr" in r.output
    assert calls["create"] == ("me/rr", "hf_test_token") and calls["upload"]["folder_path"] == str(out)
    assert calls["upload"]["repo_id"] == "me/rr"
    assert rr.is_cross_encoder(out) and not (out / "checkpoints").exists()
    meta = json.loads((out / "rerank.json").read_text())
    assert meta["start_kind"].startswith("encoder with a new cosine head") and meta["val_start"]
    assert meta["fusion_weight"] in rt.FUSION_WEIGHTS and meta["rerank_loss"] == "lambda"
    assert meta["prior_weight"] == 2.0 and "first stage's score" in (out / "README.md").read_text()
    ds = load_dataset(train_test_dir)
    from adapter.data import train_val_qrels

    train, val, _ = train_val_qrels(ds, Config())
    # lambda: a list per train question and relevant chunk (that chunk and the question's 2 hard negatives)
    assert meta["rows"] == sum(len(v) for v in train.values())
    assert [v["epoch"] for v in meta["history"]["val"]] == [0.0, 1.0, 2.0]  # first stage alone, then each epoch
    assert meta["best_epoch"] == max(meta["history"]["val"][1:], key=lambda v: v["ndcg@10"]["32"])["epoch"]
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-ranking" in card and "first stage alone" in card and "kept epoch" in card
    assert "load_reranker(" in card and "trust_remote_code" not in card

    # the installed weights are the kept epoch's: reranking validation again gives what that epoch scored
    reranker = rr.load_reranker(out)
    assert reranker.model.num_labels == 1
    from sentence_transformers import CrossEncoder

    plain = reranker.model  # as its card says; raw scores, no saturating sigmoid; the folder's code never trusted
    assert type(plain[1]) is rr.CosineHead and isinstance(plain.activation_fn, torch.nn.Identity)
    assert plain.trust_remote_code is False and isinstance(plain, CrossEncoder)
    reranker.model.max_seq_length = 48
    base = build_systems(Config().replace(encoder={"model": str(tiny_model_dir)}), progress=False)["base"]
    queries = base.encode_queries([ds.queries[q] for q in val])
    _, corpus = base.corpus.read(ds, base.encoder)
    again = rt.score_first_stage(ds, val, queries, corpus, rr.list_reranker(reranker, ds, 4))
    assert again["ndcg@10"] == pytest.approx(meta["val_best"]["32"]["ndcg@10"], abs=1e-6)

    # evaluate and compare score each system again with its top k reranked, by the same judge
    r = CliRunner().invoke(main, ["-q", "evaluate", str(train_test_dir), "--model", str(tiny_model_dir), "--reranker",
                                  str(out), "--set", "rerank.k=4", "--dims", "32", "--json", str(tmp_path / "r.json")],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    results = json.loads((tmp_path / "r.json").read_text())
    assert set(results) == {"base", "base+rerank"}
    r = CliRunner().invoke(main, ["-q", "compare", str(train_test_dir), "--base-model", str(tiny_model_dir), "--out",
                                  str(tmp_path / "rep"), "--reranker", str(out), "--set", "rerank.k=4", "--dims", "32",
                                  "--set", "report.bootstrap_samples=50"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["rerank_k"] == 4 and set(summary["rerank_gain"]) == {"base+rerank"}
    assert summary["systems"]["base+rerank"]["rerank_ms"] > 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "rerank latency" in report and "Reranking: ndcg@10 over each first stage" in report


def test_a_killed_run_resumes_and_mines_its_negatives_once(train_test_dir, tmp_path, tiny_model_dir, monkeypatch):
    ds, out, cfg = load_dataset(train_test_dir), tmp_path / "rr", tiny_cfg(tiny_model_dir)
    die_after_first_save(rt, monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        rerank_train(ds, out, cfg, progress=False)
    monkeypatch.undo()
    negatives = (out / "checkpoints" / rt.NEGATIVES_FILE).read_text()
    mined = []
    monkeypatch.setattr(rt, "mine_negatives", lambda *a, **k: mined.append(1))
    r = rerank_train(ds, out, cfg, progress=False)
    assert r.resumed_from is not None and not mined  # the negatives of the first run were read back, not mined
    meta = json.loads((out / "rerank.json").read_text())
    assert meta["resumed"] and [v["epoch"] for v in meta["history"]["val"]] == [0.0, 1.0, 2.0]
    assert json.loads(negatives)  # (the file existed and held the negatives)


def test_a_time_budget_stops_training_and_that_point_is_a_candidate(train_test_dir, tmp_path, tiny_model_dir):
    ds = load_dataset(train_test_dir)
    cfg = tiny_cfg(tiny_model_dir, max_train_seconds=1e-6)
    r = rerank_train(ds, tmp_path / "rr", cfg, progress=False)
    meta = json.loads((tmp_path / "rr" / "rerank.json").read_text())
    assert r.best_epoch < 1 and [v["epoch"] for v in meta["history"]["val"]][1:] == [r.best_epoch]


def test_under_an_adapter_base_gets_its_own_weight_and_systems_use_each_stage_s(train_test_dir, tmp_path,
                                                                                   tiny_model_dir, monkeypatch):
    from adapter.data import train_val_qrels
    from adapter.encoder import Encoder
    from adapter.model import LinearAdapter

    cfg = tiny_cfg(tiny_model_dir, max_train_seconds=1e-6, base_share=0.5)
    enc = Encoder.from_config(cfg, show_progress=False)
    a = LinearAdapter.identity(enc.dim, enc.identity)
    a.weight = (np.eye(a.dim) + 0.5 * np.random.default_rng(0).standard_normal((a.dim, a.dim))).astype(np.float32)
    file = a.save(tmp_path / "a.safetensors")
    ds = load_dataset(train_test_dir)
    mined, real = [], rt.mine_negatives

    def mine(dataset, qrels, queries, corpus, **kw):
        mined.append((set(qrels), queries.copy()))
        return real(dataset, qrels, queries, corpus, **kw)

    monkeypatch.setattr(rt, "mine_negatives", mine)
    rerank_train(ds, tmp_path / "rr", cfg, adapter=file, progress=False)
    meta = json.loads((tmp_path / "rr" / "rerank.json").read_text())
    # half the training questions (seeded) bring base's lists, half the adapter's: base's query vectors differ
    train, _, _ = train_val_qrels(ds, cfg)
    assert len(mined) == 2 and mined[0][0] | mined[1][0] == set(train) and not mined[0][0] & mined[1][0]
    assert len(mined[1][0]) == round(0.5 * len(train)) and meta["rerank_base_share"] == 0.5
    base_q = build_systems(cfg, progress=False)["base"].encode_queries([ds.queries[q] for q in train
                                                                       if q in mined[1][0]])
    assert np.allclose(mined[1][1], base_q) and not np.allclose(mined[0][1][:1], base_q[:1])
    keys = {f"adapter:{rr.file_sha(file)}", f"base:{tiny_model_dir}"}
    assert set(meta["stages"]) == keys and meta["stages"][f"adapter:{rr.file_sha(file)}"]["fusion"] == meta[
        "fusion_weight"]
    assert all(v["fusion"] in rt.FUSION_WEIGHTS for v in meta["stages"].values())
    systems = build_systems(cfg, adapters=[file], reranker=tmp_path / "rr", rerank_k=4, progress=False)
    val = train_val_qrels(ds, cfg)[1]
    for name, key in (("base", f"base:{tiny_model_dir}"), ("a", f"adapter:{rr.file_sha(file)}")):
        s = systems[f"{name}+rerank"]
        assert s.reranker.fusion == meta["stages"][key]["fusion"]
        s.reranker.model.max_seq_length = 48
        _, corpus = s.corpus.read(ds, s.encoder)
        queries = s.encode_queries([ds.queries[q] for q in val])
        got = rt.score_first_stage(ds, val, queries, corpus, rr.list_reranker(s.reranker, ds, 4))
        assert got["ndcg@10"] == pytest.approx(meta["stages"][key]["reranked"], abs=1e-6)  # what it was chosen on
        assert rt.score_first_stage(ds, val, queries, corpus)["ndcg@10"] == pytest.approx(
            meta["stages"][key]["first_stage"], abs=1e-6)


def test_bad_input_is_one_line_and_writes_nothing(train_test_dir, tmp_path, tiny_model_dir):
    def fails(*args: str) -> str:
        r = CliRunner().invoke(main, ["-q", *args])
        assert r.exit_code == 1 and r.output.startswith("Error: ") and "Traceback" not in r.output, r.output
        return r.output.strip()

    # a folder that is not a cross-encoder: a bi-encoder (sentence-transformers) folder, and an empty one
    assert "not a cross-encoder" in fails("evaluate", str(train_test_dir), "--reranker", str(tiny_model_dir))
    (tmp_path / "empty").mkdir()
    assert "not a cross-encoder" in fails("compare", str(train_test_dir), "--out", str(tmp_path / "rep"), "--reranker",
                                          str(tmp_path / "empty"))
    assert not (tmp_path / "rep").exists()
    # rerank.k below 1 or above the corpus
    ce, _ = rr.start_model(str(tiny_model_dir), 48)
    ce.save(str(tmp_path / "ce"))
    assert "outside 1..6" in fails("evaluate", str(train_test_dir), "--reranker", str(tmp_path / "ce"), "--set",
                                   "rerank.k=0")
    assert "outside 1..6" in fails("evaluate", str(train_test_dir), "--reranker", str(tmp_path / "ce"))  # default 20
    assert "outside 1..6" in fails("rerank-train", str(train_test_dir), "--out", str(tmp_path / "o"), "--set",
                                   "rerank.k=7")
    # a folder naming code from outside sentence-transformers beside the cosine head is not imported
    modules = json.loads((tmp_path / "ce" / "modules.json").read_text())
    (tmp_path / "ce" / "modules.json").write_text(json.dumps([*modules, {"idx": 9, "name": "x", "path": "x",
                                                                         "type": "evil.Module"}]))
    assert "refusing to load it" in fails("evaluate", str(train_test_dir), "--reranker", str(tmp_path / "ce"),
                                          "--set", "rerank.k=3")
    assert not (tmp_path / "o").exists()
    with pytest.raises(AdapterError, match="rerank.negatives must be at least 1"):
        rerank_train(load_dataset(train_test_dir), tmp_path / "o", tiny_cfg(tiny_model_dir, negatives=0))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("loss", ["mnrl", "bce"])
def test_the_other_losses_train_the_classifier_head_too(train_test_dir, tmp_path, tiny_model_dir, loss):
    # MultipleNegativesRankingLoss (the cross-encoder one): anchor, positive and its hard negatives as columns;
    # BinaryCrossEntropyLoss: (question, chunk, label) rows; both on a new one-logit classifier
    r = rerank_train(load_dataset(train_test_dir), tmp_path / "rr",
                     tiny_cfg(tiny_model_dir, loss=loss, epochs=1, head="classifier", fusion=False), progress=False)
    meta = json.loads((tmp_path / "rr" / "rerank.json").read_text())
    assert meta["rerank_loss"] == loss and meta["history"]["loss"] and meta["fusion_weight"] == 0.0
    assert meta["prior_weight"] == 0.0  # the prior is lambda's with fusion only
    assert meta["start_kind"] == "encoder with a new one-logit head" and meta["val_start"] is None
    assert r.best_epoch == 1.0 and rr.is_cross_encoder(tmp_path / "rr")
    assert rr.load_reranker(tmp_path / "rr").model.num_labels == 1


# ---------------------------------------------------------------------------------------------------------- trust


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A cross-encoder folder as `rerank-train` starts one (the tiny BERT with a CosineHead), saved."""
    out = tmp_path_factory.mktemp("ce") / "ce"
    rr.start_model(str(tiny_model_dir), 48)[0].save(str(out))
    return out


def test_a_rerank_json_of_another_version_is_refused_before_the_model_loads(cross_encoder_dir, tmp_path,
                                                                            monkeypatch):
    folder = tmp_path / "old-rr"
    shutil.copytree(cross_encoder_dir, folder)
    (folder / rr.META_FILE).write_text(json.dumps({"format_version": 0, "stages": {}}))
    monkeypatch.setattr(rr, "_cross_encoder", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(AdapterError) as e:
        rr.load_reranker(folder)
    assert str(e.value) == (f"{folder / 'rerank.json'}: format version 0 is not supported (this version of adapter "
                            "reads 1); re-train with this version")


def test_the_project_s_own_folder_loads_its_head_by_import_never_by_remote_code(cross_encoder_dir):
    reranker = rr.load_reranker(cross_encoder_dir)
    assert type(reranker.model[1]) is rr.CosineHead and reranker.model.trust_remote_code is False
    assert rr.start_model(str(cross_encoder_dir), 48)[1] == "cross-encoder checkpoint"


@pytest.mark.parametrize("way", ["tokenizer", "subfolder", "activation"])
def test_a_folder_naming_code_of_its_own_is_refused_in_one_line_and_none_of_it_runs(way, cross_encoder_dir,
                                                                                       train_test_dir, tmp_path,
                                                                                       tiny_model_dir, monkeypatch):
    """Issue #24: `modules.json` naming CosineHead turned trust_remote_code on for the whole folder after checking
    its top config.json only; each of these ran the folder's own Python (here: it writes ``marker``)."""
    from tests.fault_cases import crafted_reranker

    modules = tmp_path / "modules"
    modules.mkdir()
    monkeypatch.syspath_prepend(str(modules))  # activation_fn's module is importable, as an installed one would be
    marker = tmp_path / "ran"
    folder = crafted_reranker(cross_encoder_dir, tmp_path / way, way, marker, modules)
    for argv in (["evaluate", str(train_test_dir), "--model", str(tiny_model_dir), "--reranker", str(folder),
                  "--set", "rerank.k=3"],
                 ["rerank-train", str(train_test_dir), "--out", str(tmp_path / "out"), "--model", str(folder),
                  "--encoder", str(tiny_model_dir), "--set", "rerank.k=3"]):
        r = CliRunner().invoke(main, ["-q", *argv])
        assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
        assert r.output.startswith(f"Error: {folder}: names code of its own (") and "refusing to load it" in r.output
    for load in (rr.load_reranker, lambda f: rr.start_model(str(f), 48)):
        with pytest.raises(AdapterError, match="names code of its own"):
            load(folder)
    assert not marker.exists() and not (tmp_path / "out").exists()
    # and were the check ever to miss one, the loader itself runs nothing: remote code is never turned on
    monkeypatch.setattr(rr, "check_code_free", lambda folder: None)
    with contextlib.suppress(AdapterError):  # transformers may refuse the folder instead: nothing of it ran either way
        rr.load_reranker(folder)
    assert not marker.exists()


def test_only_torch_s_plain_activations_and_sentence_transformers_modules_pass(cross_encoder_dir, tmp_path):
    import shutil

    rr.check_code_free(cross_encoder_dir)
    for path, change, words in (
            ("config_sentence_transformers.json", {"activation_fn": "torch.distributed.run.main"},
             "activation_fn 'torch.distributed.run.main'"),  # torch.* is imported even without remote code
            ("1_CosineHead/config.json", {"activation_function": "os.system"}, "in 1_CosineHead/config.json"),
            ("config.json", {"custom_pipelines": {"x": {"impl": "p.P"}}}, "'custom_pipelines' in config.json")):
        folder = tmp_path / path.replace("/", "_")
        shutil.copytree(cross_encoder_dir, folder)
        (folder / path).write_text(json.dumps({**json.loads((folder / path).read_text()), **change}))
        with pytest.raises(AdapterError, match=re.escape(words)):
            rr.check_code_free(folder)
    gpt2 = tmp_path / "gpt2-like"  # a bare activation name imports nothing: not code
    shutil.copytree(cross_encoder_dir, gpt2)
    (gpt2 / "config.json").write_text(json.dumps({**json.loads((gpt2 / "config.json").read_text()),
                                                  "activation_function": "gelu_new"}))
    rr.check_code_free(gpt2)
