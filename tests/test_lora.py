"""The query-side LoRA (adapter.lora, `adapter train --form lora`) on the tiny BERT and the tiny dataset: B = 0 is
the base exactly, training lowers the loss without encoding a document, the file round-trips and refuses damage, and
the form goes through the one choice, the systems and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft")

from adapter.config import Config, LoraConfig  # noqa: E402
from adapter.errors import AdapterError  # noqa: E402
from adapter.lora import (  # noqa: E402
    QueryLora,
    encode_queries,
    fit_lora,
    load_query_transform,
    lora_settings,
    merged,
    with_lora,
)
from adapter.model import LinearAdapter, read_header  # noqa: E402
from adapter.train import Split  # noqa: E402
from tests.conftest import CHUNKS, QUESTIONS, split_tiny  # noqa: E402

CFG = Config().replace(lora={"r": 4, "epochs": 3, "lr": 5e-3, "batch_size": 4})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    from adapter.backends import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def data(tiny):
    """Question texts, the training split (base vectors), corpus ids and the corpus vectors (encoded once, before any
    fit, as a cache holds them)."""
    texts = {q: t for q, (t, _) in QUESTIONS.items()}
    qrels = {q: {c: 1 for c in cs} for q, (_, cs) in QUESTIONS.items()}
    cids = list(CHUNKS)
    corpus = np.asarray(tiny.encode_document([CHUNKS[c] for c in cids], normalize_embeddings=True), dtype=np.float32)
    split = Split(encode_queries(tiny, list(texts.values())), list(texts), qrels)
    return texts, split, cids, corpus


def test_untrained_lora_is_the_base_exactly(tiny, data):
    texts = list(data[0].values())
    base = encode_queries(tiny, texts)
    lora = with_lora(tiny, 4, lora_settings(LoraConfig(), tiny))
    assert any("lora_A" in n for n, _ in lora.named_parameters())
    np.testing.assert_array_equal(encode_queries(lora, texts), base)
    np.testing.assert_array_equal(encode_queries(merged(lora), texts), base)


def test_top_layers_name_the_models_own_last_layers(tiny, minilm):
    assert lora_settings(LoraConfig(top_layers=3), minilm)["layers"] == [3, 4, 5]  # MiniLM has six
    assert lora_settings(LoraConfig(top_layers=3), tiny)["layers"] is None  # the tiny BERT has two: all of them
    assert lora_settings(LoraConfig(top_layers=1), tiny)["layers"] == [1]


def test_training_lowers_the_loss_and_never_encodes_documents(tiny, data, monkeypatch):
    texts, split, cids, corpus = data
    calls = []
    original = type(tiny).encode_document

    def counted(self, *a, **k):
        calls.append(a)
        return original(self, *a, **k)

    monkeypatch.setattr(type(tiny), "encode_document", counted)
    fitted = fit_lora(tiny, split, texts, corpus, cids, CFG)
    assert calls == []
    losses = [h["loss"] for h in fitted.history[1:]]
    assert losses[-1] < losses[0]
    assert fitted.best_epoch == CFG.lora.epochs  # no validation: the last epoch is kept
    moved = encode_queries(fitted.model, list(texts.values()))
    assert not np.allclose(moved, encode_queries(tiny, list(texts.values())))


def test_chunks_held_out_are_never_candidates(tiny, data):
    """``outside`` rows are treated as not yet indexed: a fit with every chunk but the positives outside sees no
    negative, so its loss is 0 from the first step and nothing moves."""
    texts, split, cids, corpus = data
    positives = {c for q in split.ids for c in split.qrels[q]}
    one = Split(split.vectors[:1], split.ids[:1], {split.ids[0]: split.qrels[split.ids[0]]})
    outside = np.array([i for i, c in enumerate(cids) if c not in one.qrels[one.ids[0]]], dtype=np.int64)
    assert positives  # the fixture's questions judge chunks
    fitted = fit_lora(tiny, one, texts, corpus, cids, CFG, outside=outside)
    assert all(h["loss"] == pytest.approx(0.0, abs=1e-6) for h in fitted.history[1:])


def test_chunks_no_question_is_about_are_never_negatives(tiny, data):
    """A chunk no training question names is not a candidate at all: with one question and one positive, nothing
    else competes, so the loss is 0 and the encoder does not learn to steer queries away from the rest."""
    texts, split, cids, corpus = data
    one = Split(split.vectors[:1], split.ids[:1], {split.ids[0]: split.qrels[split.ids[0]]})
    fitted = fit_lora(tiny, one, texts, corpus, cids, CFG)
    assert all(h["loss"] == pytest.approx(0.0, abs=1e-6) for h in fitted.history[1:])
    t = list(texts.values())
    np.testing.assert_allclose(encode_queries(fitted.model, t), encode_queries(tiny, t), atol=1e-6)


def test_validation_keeps_the_base_when_no_epoch_beats_it(tiny, data):
    texts, split, cids, corpus = data
    fitted = fit_lora(tiny, split, texts, corpus, cids, CFG.replace(lora={"lr": 1e-12, "epochs": 1}), val=split)
    assert fitted.best_epoch == 0  # a step too small to move a rank: epoch 1 does not beat the base
    t = list(texts.values())
    np.testing.assert_array_equal(encode_queries(fitted.model, t), encode_queries(tiny, t))


@pytest.fixture(scope="module")
def lora_file(tiny, data, tmp_path_factory):
    texts, split, cids, corpus = data
    fitted = fit_lora(tiny, split, texts, corpus, cids, CFG)
    q = QueryLora.from_fit(fitted, "tiny@abc", CFG)
    q.metadata = {"recipe": "lora", "best_epoch": fitted.best_epoch}
    return q, q.save(tmp_path_factory.mktemp("lora") / "q.safetensors")


def test_the_file_round_trips_to_1e_5(tiny, data, lora_file):
    q, path = lora_file
    header = read_header(path)
    assert header["form"] == "lora" and header["rank"] == 4 and header["lora"]["alpha"] == LoraConfig.alpha
    back = load_query_transform(path)
    assert isinstance(back, QueryLora) and back.metadata["recipe"] == "lora"
    texts = list(data[0].values())
    np.testing.assert_allclose(back.encode_queries(texts, tiny), q.encode_queries(texts), atol=1e-5)
    with pytest.raises(AdapterError, match="exists"):
        q.save(path)
    assert path.stat().st_size < 2_000_000


def test_a_lora_file_is_refused_where_only_a_map_applies(lora_file):
    with pytest.raises(AdapterError, match="query-side LoRA"):
        LinearAdapter.load(lora_file[1])


def test_a_damaged_lora_file_is_refused_in_one_line(lora_file, tmp_path):
    data = bytearray(lora_file[1].read_bytes())
    data[-3] ^= 0xFF  # a byte of the last tensor
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="checksum") as e:
        QueryLora.load(bad)
    assert "\n" not in str(e.value)


def test_factors_of_another_model_are_refused(lora_file, minilm):
    q = QueryLora.load(lora_file[1])
    with pytest.raises(AdapterError, match="dimension"):
        q.query_model(minilm)


def test_train_form_lora_goes_through_the_choice(tmp_path, tiny_model_dir):
    """`train_adapter` with form "lora": one trial row named lora, estimated on both slices; what ships is the
    LoRA (its file in the adapter schema) or the identity, with the line saying why."""
    from adapter.choice import train_adapter
    from adapter.data import load_dataset
    from adapter.encoder import Encoder

    folder = split_tiny(tmp_path / "d")
    cfg = Config().replace(encoder={"model": str(tiny_model_dir)}, lora={"r": 4, "epochs": 2, "batch_size": 4},
                           train={"form": "lora"})
    r = train_adapter(load_dataset(folder), cfg, encoder=Encoder(str(tiny_model_dir), show_progress=False),
                      progress=False)
    assert [t["recipe"] for t in r.trials] == ["lora"]
    assert r.recipe in ("lora", "identity")
    assert r.adapter.metadata["config"]["lora"]["r"] == 4
    path = r.adapter.save(tmp_path / "out.safetensors")
    assert read_header(path)["form"] == ("lora" if r.recipe == "lora" else "full")


def test_form_auto_lets_the_lora_compete_with_the_linear_recipes(tmp_path, tiny_model_dir):
    from adapter.choice import AUTO_RECIPES, train_adapter
    from adapter.data import load_dataset
    from adapter.encoder import Encoder

    folder = split_tiny(tmp_path / "d")
    cfg = Config().replace(lora={"r": 4, "epochs": 1, "batch_size": 4}, train={"form": "auto", "epochs": 2})
    r = train_adapter(load_dataset(folder), cfg, encoder=Encoder(str(tiny_model_dir), show_progress=False),
                      progress=False)
    assert [t["recipe"] for t in r.trials] == [*AUTO_RECIPES, "lora"]  # the LoRA last: linear wins ties


@pytest.mark.parametrize("settings, message", [
    ({"train": {"form": "lora", "recipe": "pull-0.3"}}, "names a linear recipe"),
    ({"train": {"form": "wide"}}, "train.form must be one of"),
])
def test_bad_form_options_are_refused(settings, message):
    from adapter.choice import resolve_train

    with pytest.raises(AdapterError, match=message):
        resolve_train(Config().replace(**settings))


def test_arrays_without_texts_cannot_train_a_lora(data):
    from adapter.choice import train_on_vectors

    _, split, cids, corpus = data
    with pytest.raises(AdapterError, match="needs the encoder"):
        train_on_vectors(split, corpus, cids, "tiny", Config().replace(train={"form": "lora"}), progress=False)


def test_systems_encode_queries_through_the_lora_and_documents_with_the_base(tmp_path, tiny_model_dir, data,
                                                                                  lora_file):
    from adapter.encoder import Encoder
    from adapter.systems import build_systems

    enc = Encoder(str(tiny_model_dir), show_progress=False)
    q = lora_file[0]
    q = QueryLora(q.dim, enc.identity, q.r, q.settings, q.tensors)  # the fixture's file names a made-up identity
    path = q.save(tmp_path / "q.safetensors")
    systems = build_systems(Config(), encoder=enc, adapters=[path], progress=False)
    texts = list(data[0].values())
    np.testing.assert_allclose(systems["q"].encode_queries(texts), q.encode_queries(texts, enc.model), atol=1e-5)
    assert systems["q"].corpus is systems["base"].corpus  # the index as it stands: no document re-embedded


def test_cli_trains_evaluates_and_searches_with_a_lora(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from cli import main

    folder = split_tiny(tmp_path / "d")
    out = tmp_path / "q.safetensors"
    runner = CliRunner()
    common = ["--model", str(tiny_model_dir)]
    r = runner.invoke(main, ["train", str(folder), "--out", str(out), "--form", "lora", *common, "--set",
                             "lora.epochs=1", "--set", "lora.r=4", "--set", "lora.batch_size=4",
                             "--json", str(tmp_path / "t.json")])
    assert r.exit_code == 0, r.output
    assert [t["recipe"] for t in json.loads((tmp_path / "t.json").read_text())["trials"]] == ["lora"]
    r = runner.invoke(main, ["evaluate", str(folder), "--adapter", str(out), *common])
    assert r.exit_code == 0, r.output
    assert "recipe" in r.output


def test_recipe_lora_ships_the_lora_whatever_its_estimate(tmp_path, tiny_model_dir):
    """`--form lora --recipe lora` ships the refit LoRA even where the choice would keep the base."""
    from adapter.choice import recipe_names, resolve_train, train_adapter
    from adapter.data import load_dataset
    from adapter.encoder import Encoder

    cfg = Config().replace(lora={"r": 4, "epochs": 1, "batch_size": 4}, train={"form": "lora", "recipe": "lora"})
    assert recipe_names(resolve_train(cfg)) == ["lora"]
    with pytest.raises(AdapterError, match="set train.form 'lora'"):
        resolve_train(Config().replace(train={"recipe": "lora"}))
    folder = split_tiny(tmp_path / "d")
    r = train_adapter(load_dataset(folder), cfg, encoder=Encoder(str(tiny_model_dir), show_progress=False),
                      progress=False)
    assert r.recipe == "lora" and isinstance(r.adapter, QueryLora)


def test_compare_scores_a_lora_beside_a_linear_adapter_with_its_costs(tmp_path, tiny_model_dir, lora_file):
    """`adapter compare` takes both forms side by side: the LoRA's file size, its own encoder's query latency (merged:
    no separate product) and its scores, documents searched as the base's."""
    from adapter.choice import train_adapter
    from adapter.data import load_dataset
    from adapter.encoder import Encoder
    from adapter.pipeline import compare

    folder = split_tiny(tmp_path / "d")
    enc = Encoder(str(tiny_model_dir), show_progress=False)
    cfg = Config().replace(encoder={"model": str(tiny_model_dir)}, train={"epochs": 2},
                           report={"latency_queries": 2, "latency_repeats": 1, "bootstrap_samples": 20})
    linear = train_adapter(load_dataset(folder), cfg, encoder=enc, progress=False).adapter
    linear_path = linear.save(tmp_path / "linear.safetensors")
    q = lora_file[0]
    lora_path = QueryLora(q.dim, enc.identity, q.r, q.settings, q.tensors).save(tmp_path / "lora.safetensors")
    c = compare(load_dataset(folder), tmp_path / "r", cfg, adapters=[linear_path, lora_path], progress=False)
    info = c.systems["lora"]
    assert info.artifact_bytes == lora_path.stat().st_size and not info.reembed
    assert info.latency_ms > 0 and info.adapter_ms is None  # its encoder timed whole
    assert c.systems["linear"].adapter_ms is not None
    assert set(c.results) == {"base", "linear", "lora"}
