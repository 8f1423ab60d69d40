import json

import numpy as np
import pytest
from click.testing import CliRunner

from adapter.choice import resolve_train
from adapter.config import Config
from adapter.errors import AdapterError
from adapter.evaluate import evaluate
from adapter.model import LinearAdapter
from adapter.train import Split, Stopped, _random_negatives, fit, mine_hard_negatives
from cli import main
from tests.conftest import split_tiny, write_dataset

BASE = "synthetic@000000000000"


def synthetic(d: int = 16, n_chunks: int = 40, train_per: int = 5, val_per: int = 3, seed: int = 0,
              shuffled_train: bool = False, rotate: bool = True):
    """Queries are their chunk's vector seen through a random rotation plus noise: the base ranks poorly and a
    linear map (the inverse rotation) can fix it. ``shuffled_train`` gives training queries random chunks;
    ``rotate=False`` leaves queries beside their chunks, where the base is already good."""
    rng = np.random.default_rng(seed)
    corpus = rng.normal(size=(n_chunks, d)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    rot = np.linalg.qr(rng.normal(size=(d, d)))[0] if rotate else np.eye(d)
    cids = [f"c{i:02d}" for i in range(n_chunks)]

    def make(per: int, tag: str, shuffle: bool) -> Split:
        rows = np.repeat(np.arange(n_chunks), per)
        q = corpus[rows] @ rot.T.astype(np.float32) + 0.25 * rng.normal(size=(len(rows), d)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        labels = rng.permutation(rows) if shuffle else rows
        ids = [f"{tag}{i}" for i in range(len(rows))]
        return Split(q.astype(np.float32), ids, {qid: {cids[c]: 1} for qid, c in zip(ids, labels, strict=True)})

    return make(train_per, "t", shuffled_train), make(val_per, "v", False), corpus, cids


def quick(seed: int = 0, **train) -> Config:
    """Short training: 8 epochs of batches of 16, with ``train`` fields (``lr=0.05``, ``rank=16``) on top."""
    return Config().replace(seed=seed, train={"epochs": 8, "batch_size": 16, **train})


def manual(**over) -> Config:
    """``quick`` as the manual recipe, resolved as ``fit`` takes it (the "auto" loss made concrete)."""
    return resolve_train(quick(recipe="manual", **over))


@pytest.mark.parametrize("over", [{}, {"loss": "infonce"}, {"loss": "infonce", "infonce_candidates": "corpus"},
                                  {"negatives": "hard"}, {"rank": 12}, {"identity_penalty": 0.01}])
def test_training_learns_a_learnable_map(over):
    train, val, corpus, cids = synthetic()
    r = fit(train, val, corpus, cids, BASE, manual(**over), progress=False)
    assert r.best_epoch > 0
    base, best = r.base_val[16]["ndcg@10"], r.best_val[16]["ndcg@10"]  # keyed by dim, as every result
    assert best > base + 0.05, (base, best)
    # the returned adapter is the one that was scored
    again = evaluate(r.adapter.apply(val.vectors), corpus, val.qrels, val.ids, cids)[corpus.shape[1]]
    assert again["ndcg@10"] == pytest.approx(best, abs=1e-6)


def test_identity_wins_when_training_only_hurts():
    train, val, corpus, cids = synthetic(shuffled_train=True, rotate=False)  # noise labels, a good base
    r = fit(train, val, corpus, cids, BASE, manual(lr=0.05, warmup_fraction=0.0), progress=False)
    assert r.best_epoch == 0
    np.testing.assert_array_equal(r.adapter.weight, np.eye(16))
    assert r.best_val == r.base_val


@pytest.mark.parametrize("seed", range(4))
def test_shipped_adapter_never_loses_to_base_on_validation(seed):
    train, val, corpus, cids = synthetic(seed=seed, shuffled_train=seed % 2 == 1)
    r = fit(train, val, corpus, cids, BASE, manual(seed=seed), progress=False)
    shipped = evaluate(r.adapter.apply(val.vectors), corpus, val.qrels, val.ids, cids)[16]["ndcg@10"]
    base = evaluate(val.vectors, corpus, val.qrels, val.ids, cids)[16]["ndcg@10"]
    assert shipped >= base


def test_same_seed_is_bit_identical():
    train, val, corpus, cids = synthetic()
    a = fit(train, val, corpus, cids, BASE, manual(seed=5), progress=False).adapter
    b = fit(train, val, corpus, cids, BASE, manual(seed=5), progress=False).adapter
    c = fit(train, val, corpus, cids, BASE, manual(seed=6), progress=False).adapter
    assert a.weight.tobytes() == b.weight.tobytes()
    assert a.weight.tobytes() != c.weight.tobytes()


def test_negatives_are_never_relevant():
    rng = np.random.default_rng(0)
    n = 5
    q_rows = np.repeat(np.arange(4), 50)
    rel = np.unique(np.array([q * n + c for q in range(4) for c in range(4)]))  # each query: chunks 0-3 relevant
    neg = _random_negatives(q_rows, n, rel, rng)
    assert (neg == 4).all()  # the only chunk left
    train, _, corpus, _ = synthetic()
    codes = np.unique([i * len(corpus) + int(next(iter(r)).lstrip("c")) for i, r in enumerate(train.qrels.values())])
    hard = mine_hard_negatives(train.vectors, corpus, codes, pool=5)
    assert hard.shape == (len(train.ids), 5)
    assert not np.isin(np.arange(len(hard))[:, None] * len(corpus) + hard, codes).any()


def test_bad_training_options():
    train, val, corpus, cids = synthetic()
    with pytest.raises(AdapterError, match="train.loss"):
        resolve_train(quick(loss="mse"))
    with pytest.raises(AdapterError, match="train.rank"):
        fit(train, val, corpus, cids, BASE, manual(rank=16), progress=False)
    with pytest.raises(AdapterError, match=r"^train.identity_penalty must be a number >= 0, not 'auto'$"):
        resolve_train(quick(identity_penalty="auto"))  # one way to choose: the recipes, by validation
    with pytest.raises(AdapterError, match=r"^train.epoch_choice must be one of average, last, best, not 'x'$"):
        resolve_train(quick(epoch_choice="x"))
    with pytest.raises(AdapterError, match="takes a concrete loss, not 'auto'"):  # fit trusts a resolved config
        fit(train, val, corpus, cids, BASE, quick(), progress=False)


def test_options_are_resolved_once_and_resolving_again_changes_nothing():
    """resolve_train is the one place options are made concrete: a recipe axis set means "manual", whose "auto"
    loss becomes the form's; what it returns passes through it again unchanged (the CLI resolves, then
    train_adapter does)."""
    for given, recipe, loss in (({}, "auto", "auto"), ({"rank": 16}, "manual", "infonce"),
                                ({"identity_penalty": 0.1}, "manual", "triplet"),
                                ({"loss": "triplet"}, "manual", "triplet"), ({"recipe": "lowrank"}, "lowrank", "auto")):
        once = resolve_train(Config().replace(train=given))
        assert (once.train.recipe, once.train.loss) == (recipe, loss), given
        assert resolve_train(once) == once, given


# ---------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def trained(tmp_path_factory):
    """The tiny dataset split by query, and an adapter trained on it through the CLI."""
    folder = split_tiny(tmp_path_factory.mktemp("t") / "ds")
    out = folder.parent / "tiny-adapter.safetensors"
    r = CliRunner().invoke(main, ["train", str(folder), "--out", str(out), "--set", "train.epochs=3", "--set",
                                  "train.batch_size=2",
                                  "--recipe", "infonce"])
    assert r.exit_code == 0, r.output
    return folder, out, r.output


def test_train_cli_writes_a_complete_file(trained):
    folder, out, output = trained
    assert "coverage: " in output and "shipped " in output and "wrote" in output
    a = LinearAdapter.load(out)
    assert a.dim == 384 and a.base_model.startswith("all-MiniLM-L6-v2@")
    meta = a.metadata
    assert meta["config"]["train"]["epochs"] == 3
    assert meta["config"]["train"]["lr"] == Config().train.lr  # resolved config travels along
    assert len(meta["data_fingerprint"]) == 16 and meta["trained_on"] == "train"
    assert "ndcg@10" in meta["val_base"][384] and "ndcg@10" in meta["val_best"][384]
    assert [v["epoch"] for v in meta["history"]["val"]] == [0, 3] and len(meta["history"]["loss"]) == 3
    assert meta["history_recipe"] == "infonce"
    assert meta["recipe"] in ("infonce", "identity") and meta["objective"] == "both"
    assert meta["coverage"]["chunks"] == 6 and [t["recipe"] for t in meta["trials"]] == ["infonce"]
    assert set(meta["estimates"]) == {"seen", "unseen"}
    assert 500_000 < out.stat().st_size <= 600_000  # 384 x 384 float32 and a small header


def test_evaluate_scores_adapters_beside_base(trained, tmp_path):
    folder, out, _ = trained
    twin = tmp_path / "twin.safetensors"
    twin.write_bytes(out.read_bytes())
    js = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["evaluate", str(folder), "--adapter", str(out), "--adapter", str(twin),
                                  "--dims", "384,64", "--json", str(js)])
    assert r.exit_code == 0, r.output
    results = json.loads(js.read_text())
    assert list(results) == ["base", "tiny-adapter", "twin"] and list(results["twin"]) == ["384", "64"]
    assert results["twin"] == results["tiny-adapter"]
    assert "Δ tiny-adapter" in r.output


def test_train_refuses_bad_input(trained, tmp_path):
    folder, out, _ = trained
    before = out.read_bytes()
    r = CliRunner().invoke(main, ["train", str(folder), "--out", str(out)])
    assert r.exit_code == 1 and "already exists" in r.output and out.read_bytes() == before
    (folder / "qrels" / "empty.tsv").write_text("query-id\tcorpus-id\tscore\n")
    r = CliRunner().invoke(main, ["train", str(folder), "--out", str(tmp_path / "x.safetensors"), "--set",
                                  "split.train_split=empty"])
    assert r.exit_code == 1 and "split has no queries" in r.output and r.output.count("\n") == 1
    r = CliRunner().invoke(main, ["train", str(folder), "--out", str(tmp_path / "x.safetensors"), "--set",
                                  "split.train_split=nope"])
    assert r.exit_code == 1 and "no qrels/nope.tsv" in r.output
    assert not (tmp_path / "x.safetensors").exists()


def test_both_validation_slices_are_carved_whatever_the_split(tmp_path, minilm):
    from adapter.choice import train_adapter
    from adapter.data import load_dataset, split_dataset
    from adapter.encoder import Encoder

    folder = write_dataset(tmp_path / "ds")
    enc = Encoder(minilm, show_progress=False)
    for by in ("chunk", "query"):
        split_dataset(folder, by=by, test_fraction=0.2, seed=0, force=True)
        r = train_adapter(load_dataset(folder), Config().replace(train={"epochs": 1, "recipe": "infonce"}), encoder=enc,
                          progress=False)
        est = r.adapter.metadata["estimates"]
        assert est["seen"]["queries"] >= 1 and est["unseen"]["chunks"] >= 1, (by, est)
        assert "seen: " in r.adapter.metadata["validation"] and "unseen: " in r.adapter.metadata["validation"]


# ------------------------------------------------------------------------------- coverage, slices and the choice


def test_cross_folds_score_every_question_once_as_seen_and_once_as_unseen():
    from adapter.choice import cross_folds

    train, _, _, _ = synthetic(n_chunks=40, train_per=5)
    folds, warnings = cross_folds(train, Config())
    chunks = lambda s: {c for r in s.qrels.values() for c in r}  # noqa: E731
    assert not warnings and len(folds) == 5
    # every training question is held out once by query and once with its whole chunk, never by the fit scoring it
    assert sorted(q for f in folds for q in f.seen.ids) == sorted(train.ids)
    assert sorted(q for f in folds for q in f.unseen.ids) == sorted(train.ids)
    for f in folds:
        assert not set(f.fit.ids) & (set(f.seen.ids) | set(f.unseen.ids))
        assert len(chunks(f.unseen)) == 8 and not chunks(f.unseen) & chunks(f.fit)  # a fifth of the chunks, whole
        assert chunks(f.seen) <= chunks(f.fit)  # a seen question's chunk keeps its other questions in the fit
        assert len(f.fit.ids) == len(train.ids) - len(f.seen.ids) - len(f.unseen.ids)
    # the same seed deals the same folds; a question budget stops after the first fold that reaches it
    again, _ = cross_folds(train, Config())
    assert [f.seen.ids for f in again] == [f.seen.ids for f in folds]
    assert len(cross_folds(train, Config().replace(crossfit_questions=30))[0]) == 1


def test_cross_folds_fall_back_to_one_kind_and_say_how_much_is_needed():
    from adapter.choice import cross_folds
    from adapter.train import Split

    train, _, _, _ = synthetic(n_chunks=3, train_per=3)  # 9 questions on 3 chunks: no unseen slice
    folds, warnings = cross_folds(train, Config())
    assert all(f.unseen is None for f in folds) and sorted(q for f in folds for q in f.seen.ids) == sorted(train.ids)
    assert warnings == ["no unseen-chunk estimate: holding out whole chunks needs questions on at least 5 chunks, "
                        "the training split has 3"]
    tiny = Split(train.vectors[:2], train.ids[:2], {q: train.qrels[q] for q in train.ids[:2]})
    with pytest.raises(AdapterError, match=r"too few training questions to validate \(2 on 1 chunks\): need at "
                                           r"least 4"):
        cross_folds(tiny, Config())


def test_clustered_standard_error_counts_a_chunk_once():
    from adapter.choice import clustered_se

    # two chunks, each with two questions that move together: the s.e. is that of two draws, not four
    delta = np.array([0.1, 0.1, -0.1, -0.1])
    se = clustered_se(delta, ["a", "a", "b", "b"])
    # group sums of (delta - mean) are 0.2 and -0.2; sqrt(2/1 * 0.08) / 4 = 0.1
    assert se == pytest.approx(0.1)
    assert clustered_se(delta, ["a", "b", "c", "d"]) < se
    assert clustered_se(delta, ["a"] * 4) == float("inf")


def test_select_keeps_unseen_chunks_at_base_within_their_noise():
    from adapter.choice import select

    def row(seen, unseen, se):
        return {"seen": {"delta": seen, "se": 0.01}, "unseen": {"delta": unseen, "se": se}}

    trials = [row(0.20, -0.05, 0.01), row(0.10, -0.005, 0.01), row(0.05, 0.02, 0.01)]
    assert select([dict(t) for t in trials], "both", 1.0) == 1  # the first is 5 s.e. below base
    assert select([dict(t) for t in trials], "both", -1.0) == 2  # strict: only a clear unseen gain is safe
    assert select([dict(t) for t in trials], "seen", 1.0) == 0
    assert select([row(-0.01, 0.0, 0.01)], "both", 1.0) is None  # no gain: the identity ships
    assert select([{"seen": None, "unseen": {"delta": 0.03, "se": 0.01}}], "both", 1.0) == 0
    assert select([row(0.03, 0.0, 0.01) | {"seen": {"delta": 0.03, "se": 0.02}}], "seen", 1.0) is None  # in noise


def test_select_can_judge_unseen_chunks_at_every_dim():
    from adapter.choice import select

    def est(delta, by_dim=None):
        return {"delta": delta, "se": 0.01, "by_dim": by_dim or {}}

    flat = {384: {"delta": 0.02, "se": 0.01}, 64: {"delta": 0.02, "se": 0.01}}
    dip = {384: {"delta": 0.06, "se": 0.01}, 64: {"delta": -0.03, "se": 0.01}}  # mean over dims +0.015
    trials = [{"seen": est(0.20), "unseen": est(0.015, dip)}, {"seen": est(0.10), "unseen": est(0.02, flat)}]
    assert select([dict(t) for t in trials], "both", 1.0) == 0
    assert select([dict(t) for t in trials], "both", 1.0, worst_dim=True) == 1  # 3 s.e. below base at dim 64


def test_uncovered_pull_holds_chunks_without_questions_and_learns_the_rest():
    from adapter.choice import recipe_config
    from adapter.train import uncovered_moment

    train, val, corpus, cids = synthetic(d=16, n_chunks=40)
    rng = np.random.default_rng(1)
    corpus[20:] = 0.0  # the chunks without questions lie in a 4-d subspace: the pull holds that and frees the rest
    corpus[20:, :4] = rng.normal(size=(20, 4))
    corpus[20:] /= np.linalg.norm(corpus[20:], axis=1, keepdims=True)
    half = set(cids[:20])  # training questions for half the chunks only
    qrels = {q: r for q, r in train.qrels.items() if set(r) <= half}
    ids = [q for q in train.ids if q in qrels]
    part = Split(train.vectors[[train.ids.index(q) for q in ids]], ids, qrels)

    m = uncovered_moment(corpus, np.arange(20), 2.0).numpy()
    np.testing.assert_allclose(m, 2.0 * 16 * corpus[20:].T.astype(np.float64) @ corpus[20:] / 20, rtol=1e-5)
    assert uncovered_moment(corpus, np.arange(40), 2.0) is None and uncovered_moment(corpus, np.arange(20), 0) is None
    fewer = uncovered_moment(corpus, np.arange(20), 2.0, outside=np.arange(20, 30)).numpy()
    np.testing.assert_allclose(fewer, 2.0 * 16 * corpus[30:].T.astype(np.float64) @ corpus[30:] / 10, rtol=1e-5)

    def moved(cfg):
        w = fit(part, None, corpus, cids, BASE, cfg, progress=False).adapter.weight
        change = corpus @ (w - np.eye(16))
        return float((change[:20] ** 2).sum(1).mean()), float((change[20:] ** 2).sum(1).mean())

    long = quick(epochs=20)  # long enough for the free map to wander (0.16 on covered)
    free_cov, free_unc = moved(recipe_config(long, "pull-0.01"))
    held_cov, held_unc = moved(recipe_config(long, "uncovered-1"))
    assert held_unc < 0.5 * free_unc  # chunks without questions stay put (measured 0.22x) ...
    assert held_cov > 0.7 * free_cov  # ... while the map still moves where the questions are (0.89x)


def test_auto_recipe_learns_a_learnable_map_and_records_every_trial():
    from adapter.choice import AUTO_RECIPES, train_on_vectors

    train, _, corpus, cids = synthetic(d=32, n_chunks=40, train_per=6)
    r = train_on_vectors(train, corpus, cids, BASE, quick(), progress=False)
    assert [t["recipe"] for t in r.trials] == list(AUTO_RECIPES)
    assert r.recipe in AUTO_RECIPES and sum(t["chosen"] for t in r.trials) == 1
    assert r.estimates["seen"]["delta"] > 0.05
    assert r.estimates["unseen"]["queries"] == 40 * 6 and r.estimates["unseen"]["folds"] == 5
    assert r.coverage == {"chunks": 40, "covered": 40, "share": 1.0} and not r.warnings
    shipped = evaluate(r.adapter.apply(train.vectors), corpus, train.qrels, train.ids, cids)[32]["ndcg@10"]
    assert shipped > evaluate(train.vectors, corpus, train.qrels, train.ids, cids)[32]["ndcg@10"] + 0.1


def test_identity_ships_when_no_recipe_gains_and_partial_coverage_is_one_line():
    from adapter.choice import train_on_vectors

    train, _, corpus, cids = synthetic(d=32, n_chunks=40, train_per=10, shuffled_train=True, rotate=False)
    corpus = np.concatenate([corpus, corpus[:10] * -1.0])  # ten more chunks that no question is about
    cids = cids + [f"x{i}" for i in range(10)]
    r = train_on_vectors(train, corpus, cids, BASE, quick(lr=0.05), progress=False)
    assert r.recipe == "identity" and r.best_epoch == 0
    np.testing.assert_array_equal(r.adapter.weight, np.eye(32))
    assert r.coverage["covered"] == 40 and r.coverage["share"] == 0.8
    (line,) = [w for w in r.warnings if w.startswith("partial coverage")]
    assert line.startswith("partial coverage: 10 of 50 chunks (20%) have no training questions; on such chunks "
                           "expect ndcg@10 +0.0% ± 0.0% (the unseen-chunk estimate)")
    # why, in numbers, and what would change it
    (why,) = [w for w in r.warnings if w.startswith("shipped the identity")]
    best = max(r.trials, key=lambda t: t["seen"]["delta"])
    assert why.startswith(f"shipped the identity: the best recipe, {best['recipe']}, changed ndcg@10 by ")
    assert f" on {len(train.ids)} seen-chunk questions about 40 chunks, short of the 2 standard errors" in why
    assert "More questions per chunk" in why and "train.objective 'seen'" in why
    assert f"train.recipe '{best['recipe']}' ships it anyway" in why


def test_a_recipe_asked_for_by_name_ships_with_its_estimate_even_within_noise():
    """The user overrules the choice: a named recipe ships though it does not clear the bar, and a line says so."""
    from adapter.choice import train_on_vectors

    train, _, corpus, cids = synthetic(d=32, n_chunks=40, train_per=10, shuffled_train=True, rotate=False)
    r = train_on_vectors(train, corpus, cids, BASE, quick(lr=0.05, recipe="pull-0.1"), progress=False)
    assert r.recipe == "pull-0.1" and [t["recipe"] for t in r.trials] == ["pull-0.1"] and r.trials[0]["chosen"]
    assert not np.array_equal(r.adapter.weight, np.eye(32))  # trained, not the identity
    assert r.estimates["seen"]["queries"] == len(train.ids)
    (line,) = [w for w in r.warnings if w.startswith("pull-0.1 ships because it was asked for")]
    assert "the automatic choice would ship the identity" in line


def test_two_questions_per_chunk_are_enough_to_find_a_real_map():
    """Every training question counts toward the choice: at two questions per chunk a real map ships, where one held-out
    slice of a tenth of the questions left every recipe within noise."""
    from adapter.choice import train_on_vectors

    train, val, corpus, cids = synthetic(d=32, n_chunks=150, train_per=2, val_per=2, seed=3)
    r = train_on_vectors(train, corpus, cids, BASE, quick(), progress=False)
    assert r.recipe != "identity" and r.estimates["seen"]["queries"] == 300
    before = evaluate(val.vectors, corpus, val.qrels, val.ids, cids)[32]["ndcg@10"]
    assert evaluate(r.adapter.apply(val.vectors), corpus, val.qrels, val.ids, cids)[32]["ndcg@10"] > before


def test_matryoshka_and_late_averaging_recipes_train():
    from adapter.choice import RECIPES, recipe_config

    train, val, corpus, cids = synthetic()
    for name in ("matryoshka", "lowrank", "infonce-corpus", "pull-0.1"):
        cfg = recipe_config(quick(rank=None), name).replace(rank=RECIPES[name]["rank"] and 4)
        r = fit(train, val, corpus, cids, BASE, cfg, progress=False)
        assert r.best_epoch == 8 and r.best_val[16]["ndcg@10"] > r.base_val[16]["ndcg@10"] + 0.02, name


def test_bad_objective_and_unlearnable_data_are_one_line_errors():
    from adapter.choice import train_on_vectors
    from adapter.train import Split

    train, _, corpus, cids = synthetic(n_chunks=6)
    with pytest.raises(AdapterError, match="train.objective must be 'both' or 'seen', not 'all'"):
        train_on_vectors(train, corpus, cids, BASE, quick(objective="all"), progress=False)
    everything = Split(train.vectors, train.ids, {q: {c: 1 for c in cids} for q in train.ids})
    with pytest.raises(AdapterError, match=r"every chunk \(6\) is relevant to every training question"):
        train_on_vectors(everything, corpus, cids, BASE, quick(), progress=False)


def test_train_cli_json_and_evaluate_show_the_estimates(trained, tmp_path):
    from adapter.choice import AUTO_RECIPES

    folder, out, _ = trained
    js, new = tmp_path / "t.json", tmp_path / "auto.safetensors"
    r = CliRunner().invoke(main, ["train", str(folder), "--out", str(new), "--set", "train.epochs=2", "--set",
                                  "train.batch_size=2",
                                  "--json", str(js)])
    assert r.exit_code == 0, r.output
    got = json.loads(js.read_text())
    assert got["objective"] == "both" and len(got["trials"]) == len(AUTO_RECIPES) and got["trials"] == \
        LinearAdapter.load(new).metadata["trials"]
    r = CliRunner().invoke(main, ["evaluate", str(folder), "--adapter", str(new), "--dims", "384"])
    assert r.exit_code == 0 and "auto: recipe " in r.output and "seen chunks +" in r.output, r.output
    r = CliRunner().invoke(main, ["train", str(folder), "--out", str(tmp_path / "x.safetensors"), "--objective", "x"])
    assert r.exit_code == 2 and "Invalid value for '--objective': 'x' is not one of 'both', 'seen'" in r.output
    # the library's check speaks of train.objective; the command names it by its flag
    r = CliRunner().invoke(main, ["train", str(folder), "--out", str(tmp_path / "x.safetensors"), "--set",
                                  "train.objective=x"])
    assert r.exit_code == 1 and r.output == "Error: --objective must be 'both' or 'seen', not 'x'\n"
    r = CliRunner().invoke(main, ["train", str(folder), "--out", str(tmp_path / "x.safetensors"), "--set",
                                  "train.epoch_choice=first"])
    assert r.exit_code == 1 and r.output == ("Error: train.epoch_choice must be one of average, last, best, not "
                                             "'first'\n")  # no flag: the key, as --set takes it


# ------------------------------------------------------------------------------------------ scale (issue #14)


def test_validation_is_a_seeded_sample_only_above_the_budget():
    """Each validation question costs a search over every chunk: above ``val_budget`` question x chunk scores a
    seeded sample of ``val_budget // chunks`` questions (at least MIN_VAL_QUESTIONS) is scored, in order."""
    from adapter.train import MIN_VAL_QUESTIONS, bounded

    train, _, _, _ = synthetic(n_chunks=40, train_per=10)  # 400 questions
    assert bounded(train, 215, Config()) is train  # AppleQA-sized data: every question, untouched
    small = Config().replace(val_budget=400 * 150)
    a, b = bounded(train, 200, small), bounded(train, 200, small)
    assert len(a.ids) == 300 and a.ids == b.ids and set(a.qrels) == set(a.ids)
    assert a.ids == [q for q in train.ids if q in set(a.ids)]  # the questions' own order
    np.testing.assert_array_equal(a.vectors, train.vectors[[train.ids.index(q) for q in a.ids]])
    assert bounded(train, 200, small.replace(seed=1)).ids != a.ids
    assert len(bounded(train, 10 ** 9, small).ids) == MIN_VAL_QUESTIONS  # a floor, however large the corpus


def test_sampled_validation_still_ranks_against_every_chunk_and_says_how_many():
    """With a tiny budget the slices are sampled, the estimates say of how many, and the choice still finds the map."""
    from adapter.choice import train_on_vectors
    from adapter.train import MIN_VAL_QUESTIONS

    train, _, corpus, cids = synthetic(d=32, n_chunks=200, train_per=4)  # each fold's unseen slice: 40 x 4 = 160
    r = train_on_vectors(train, corpus, cids, BASE, quick(val_budget=1), progress=False)
    unseen = r.estimates["unseen"]
    assert unseen["folds"] == 5 and unseen["queries"] == 5 * MIN_VAL_QUESTIONS and unseen["held_out"] == 800
    assert r.recipe != "identity" and r.estimates["seen"]["delta"] > 0.05
    assert r.base_val[32]["ndcg@10"] == pytest.approx(r.estimates["seen"]["base"], abs=1e-6)


def test_training_reads_a_memory_mapped_corpus_as_it_is(tmp_path):
    """A --corpus-vectors .npy is memory-mapped read-only: training gathers rows from it and never copies or writes
    it, so the adapter is bit-identical to training on the array in memory."""
    train, val, corpus, cids = synthetic()
    np.save(tmp_path / "c.npy", corpus)
    mapped = np.load(tmp_path / "c.npy", mmap_mode="r")
    for over in ({}, {"loss": "infonce", "matryoshka": True}):
        a = fit(train, val, corpus, cids, BASE, manual(**over), progress=False)
        b = fit(train, val, mapped, cids, BASE, manual(**over), progress=False)
        assert a.adapter.weight.tobytes() == b.adapter.weight.tobytes() and a.best_epoch == b.best_epoch


def test_corpus_vectors_in_corpus_order_are_used_as_they_are(tmp_path):
    """--corpus-vectors whose rows already follow corpus.jsonl (distractors after) stay the memory-mapped file: no
    copy of a million-row array; any other order is put in corpus order, as before."""
    from adapter.corpus import StoreSource
    from adapter.data import load_dataset

    ds = load_dataset(write_dataset(tmp_path / "ds"))
    cids = list(ds.corpus) + ["extra1", "extra2"]
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(cids), 8)).astype(np.float32)
    np.save(tmp_path / "v.npy", vectors)
    (tmp_path / "ids.txt").write_text("\n".join(cids) + "\n")
    (tmp_path / "rev.txt").write_text("\n".join(cids[::-1]) + "\n")
    enc = type("E", (), {"dim": 8, "identity": "x"})()
    ids, out = StoreSource(vectors=str(tmp_path / "v.npy"), ids=str(tmp_path / "ids.txt")).read(ds, enc)
    assert ids == cids and not out.flags.writeable and not out.flags.owndata  # the read-only mapping itself
    ids, out = StoreSource(vectors=str(tmp_path / "v.npy"), ids=str(tmp_path / "rev.txt")).read(ds, enc)
    assert ids == list(ds.corpus) + ["extra2", "extra1"] and out.flags.owndata
    rev = cids[::-1]
    np.testing.assert_array_equal(out, vectors[[rev.index(c) for c in ids]])


def test_uncovered_pulls_with_nothing_to_act_on_are_fitted_once(monkeypatch):
    """With every chunk covered the uncovered pulls train exactly as pull-0.01: one fit serves the three rows; with
    chunks left uncovered each recipe is fitted (the rows then differ)."""
    import adapter.choice as choice_mod

    fits: list[float] = []
    real = choice_mod.fit

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)  # a refit started ahead of the choice and stopped raises: not counted
        fits.append(args[5].train.uncovered_pull)
        return out

    monkeypatch.setattr(choice_mod, "fit", counted)
    train, _, corpus, cids = synthetic(d=32, n_chunks=40, train_per=6)
    r = choice_mod.train_on_vectors(train, corpus, cids, BASE, quick(), progress=False)
    trials = {t["recipe"]: t for t in r.trials}
    assert list(trials) == list(choice_mod.AUTO_RECIPES)
    refits = 1 if r.recipe != "identity" else 0
    folds = r.estimates["seen"]["folds"]
    # uncovered-1 stands for uncovered-0.3 and pull-0.01: five recipes, each fitted once per fold
    assert len(fits) == (len(choice_mod.AUTO_RECIPES) - 2) * folds + refits
    assert trials["uncovered-0.3"]["same_as"] == trials["pull-0.01"]["same_as"] == "uncovered-1"
    assert trials["pull-0.01"]["seen"] == trials["uncovered-1"]["seen"]
    assert trials["pull-0.01"]["identity_penalty"] == 0.01
    assert trials["pull-0.01"]["uncovered_pull"] == 0.0 and trials["uncovered-1"]["uncovered_pull"] == 1.0
    alone = choice_mod.fit(train, None, corpus, cids, BASE, choice_mod.recipe_config(quick(), "pull-0.01"),
                          progress=False)
    shared = choice_mod.fit(train, None, corpus, cids, BASE, choice_mod.recipe_config(quick(), "uncovered-1"),
                           progress=False)
    np.testing.assert_array_equal(alone.adapter.weight, shared.adapter.weight)  # why one fit may stand for both

    fits.clear()
    more = np.concatenate([corpus, -corpus[:10]])  # ten chunks no question is about: the uncovered pulls act
    r = choice_mod.train_on_vectors(train, more, cids + [f"x{i}" for i in range(10)], BASE, quick(), progress=False)
    assert len(fits) == len(choice_mod.AUTO_RECIPES) * folds + (1 if r.recipe != "identity" else 0)
    assert not any("same_as" in t for t in r.trials)


def _with_uncovered():
    train, _, corpus, cids = synthetic(d=32, n_chunks=40, train_per=6)
    return train, np.concatenate([corpus, -corpus[:10]]), cids + [f"x{i}" for i in range(10)]


def _same_result(a, b):
    np.testing.assert_array_equal(a.adapter.weight, b.adapter.weight)
    assert a.recipe == b.recipe and a.estimates == b.estimates
    drop = lambda t: {k: v for k, v in t.items() if k != "seconds"}  # noqa: E731
    assert [drop(t) for t in a.trials] == [drop(t) for t in b.trials]


def _hold_last_trial(monkeypatch, train, last: str, hold_refit: bool = False) -> list[str]:
    """Make the interleaving certain: the last fold's fit of ``last`` (the recipe started last) waits until a refit
    has started, and with ``hold_refit`` a refit started ahead of the choice waits to be told to stop. Returns how
    each fit ended."""
    import threading

    import adapter.choice as choice_mod

    real, refit_started, ends, started = choice_mod.fit, threading.Event(), [], []
    n_folds = len(choice_mod.cross_folds(train, quick())[0])

    def held(*args, **kwargs):
        refit = args[0] is train  # fold fits train on the questions a fold leaves in
        if refit:
            refit_started.set()
            if hold_refit and kwargs.get("stop") is not None:
                kwargs["stop"].wait(30)
        elif args[5].train == choice_mod.recipe_config(args[5], last).train:
            started.append(1)
            if len(started) == n_folds:  # the very last fit to start
                refit_started.wait(30)
        try:
            out = real(*args, **kwargs)
        except Stopped:
            ends.append("stopped")
            raise
        ends.append("finished" if refit else "trial")
        return out

    monkeypatch.setattr(choice_mod, "fit", held)
    return ends


def test_refit_started_beside_the_last_trial_ships_what_waiting_would(monkeypatch, caplog):
    """With a worker idle the refit of the recipe the finished trials choose starts beside the last trial; the choice
    is still made on every trial, so the file is the one a single worker (no refit ahead) ships."""
    from adapter.choice import train_on_vectors

    train, corpus, cids = _with_uncovered()
    alone = train_on_vectors(train, corpus, cids, BASE, quick(workers=1), progress=False)
    assert alone.recipe not in ("identity", "lowrank")  # lowrank starts last: the bet is on the others
    ends = _hold_last_trial(monkeypatch, train, "lowrank")
    with caplog.at_level("INFO", logger="adapter.choice"):
        ahead = train_on_vectors(train, corpus, cids, BASE, quick(workers=2), progress=False)
    assert f"refitting {alone.recipe} on every training question while 1 fit(s) run" in caplog.text
    assert ends.count("finished") == 1 and "stopped" not in ends  # the refit ahead is the one that ships
    _same_result(alone, ahead)


def test_refit_ahead_that_the_last_trial_overturns_is_stopped(monkeypatch, caplog):
    """Start the chosen recipe's trial last: the trials before it choose another, whose refit is stopped when the
    last trial moves the choice; what ships is still the single worker's file."""
    import adapter.choice as choice_mod

    train, corpus, cids = _with_uncovered()
    alone = choice_mod.train_on_vectors(train, corpus, cids, BASE, quick(workers=1), progress=False)
    real_order = choice_mod.run_order
    monkeypatch.setattr(choice_mod, "run_order", lambda names, effective: [
        *(n for n in real_order(names, effective) if n != alone.recipe), alone.recipe])
    ends = _hold_last_trial(monkeypatch, train, alone.recipe, hold_refit=True)
    with caplog.at_level("INFO", logger="adapter.choice"):
        ahead = choice_mod.train_on_vectors(train, corpus, cids, BASE, quick(workers=2), progress=False)
    assert "the last trials moved the choice from " in caplog.text and f" to {alone.recipe}: " in caplog.text
    assert ends.count("stopped") == 1 and ends.count("finished") == 1  # the bet stopped, the chosen one refit
    _same_result(alone, ahead)


def test_the_pulls_value_and_gradient_are_the_quadratic_forms():
    import torch

    from adapter.train import identity_pull

    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    for form in (a + a.T, torch.tensor(0.3, dtype=torch.float64)):
        change = torch.randn(6, 6, generator=g, dtype=torch.float64, requires_grad=True)
        plain = (change * (form @ change if form.dim() else form * change)).sum()
        (want,) = torch.autograd.grad(plain, change)
        value = identity_pull(change, form)
        (got,) = torch.autograd.grad(value, change)
        assert value.item() == pytest.approx(plain.item(), rel=1e-12)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [0.01, 100.0])  # below the limit and far above it
def test_clip_grads_is_clip_grad_norm(scale):
    import torch

    from adapter.train import clip_grads

    g = torch.Generator().manual_seed(0)
    ours = [torch.zeros(8, 3, requires_grad=True), torch.zeros(3, 8, requires_grad=True)]
    stock = [torch.zeros(8, 3, requires_grad=True), torch.zeros(3, 8, requires_grad=True)]
    for a, b in zip(ours, stock, strict=True):
        a.grad = scale * torch.randn(a.shape, generator=g)
        b.grad = a.grad.clone()
    clip_grads(ours, 1.0)
    torch.nn.utils.clip_grad_norm_(stock, 1.0)
    for a, b in zip(ours, stock, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_the_report_names_an_identity_adapter_and_draws_no_curve_for_it():
    from adapter.pipeline import training_curves
    from adapter.report import Comparison, SystemInfo, cost_table

    history = {"loss": [{"epoch": 1, "loss": 0.5}], "val": [{"epoch": 0, "ndcg@10": {384: 0.5}},
                                                             {"epoch": 1, "ndcg@10": {384: 0.6}}]}
    assert training_curves({"recipe": "pull-0.1", "history": history})["val"] == [0.5, 0.6]
    assert training_curves({"recipe": "identity", "history": history}) is None  # it trained nothing of its own
    systems = {"base": SystemInfo("base", "m", None, 1, False, 1.0),
               "mine": SystemInfo("adapter", "a.safetensors", 2.0, 10, False, 1.0, identity=True)}
    table = cost_table(Comparison({}, systems, {}, 0, []), 10)
    assert "| mine | query adapter (the identity: no recipe cleared validation) |" in table
    assert "| base | base model |" in table
