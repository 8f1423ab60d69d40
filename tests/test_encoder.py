import json

import numpy as np
import pytest
from click.testing import CliRunner

from adapter.encoder import Encoder, load_model, resolve_model, truncate
from adapter.errors import AdapterError
from cli import main
from tests.conftest import CHUNKS


def test_bundled_model_resolves_offline():
    path = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    assert path != "sentence-transformers/all-MiniLM-L6-v2" and path.endswith("model")
    assert resolve_model("some/other-model") == "some/other-model"


def test_each_text_is_embedded_once(minilm, tmp_path):
    texts = list(CHUNKS.values())
    enc = Encoder(minilm, cache_dir=tmp_path, show_progress=False)
    first = enc.encode_documents(texts + texts[:2])  # repeats inside one call are embedded once
    assert enc.texts_encoded == len(texts)
    assert first.shape == (len(texts) + 2, 384) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    # a fresh encoder (another command, another run) reads everything from disk
    again = Encoder(minilm, cache_dir=tmp_path, show_progress=False)
    np.testing.assert_array_equal(again.encode_documents(texts), first[: len(texts)])
    assert again.texts_encoded == 0
    # a grown dataset embeds only the new text
    again.encode_documents([*texts, "Air valves on trunk mains are exercised twice a year."])
    assert again.texts_encoded == 1


def test_cached_vectors_equal_fresh_ones(minilm, tmp_path):
    texts = list(CHUNKS.values())
    cached = Encoder(minilm, cache_dir=tmp_path, show_progress=False).encode_queries(texts)
    direct = minilm.encode_query(texts, normalize_embeddings=True)
    np.testing.assert_allclose(cached, direct, atol=1e-6)


def test_roles_with_prompts_are_cached_apart(tiny_model_dir, tmp_path):
    model = load_model(str(tiny_model_dir))
    model.prompts = {"query": "query: ", "document": "passage: "}
    enc = Encoder(model, cache_dir=tmp_path, show_progress=False)
    q = enc.encode_queries(["burst main"])
    d = enc.encode_documents(["burst main"])
    assert enc.texts_encoded == 2 and not np.allclose(q, d)


def test_another_model_has_its_own_cache(minilm, tiny_model_dir, tmp_path):
    a = Encoder(minilm, cache_dir=tmp_path, show_progress=False)
    b = Encoder(str(tiny_model_dir), cache_dir=tmp_path, show_progress=False)
    assert a.fingerprint != b.fingerprint and b.dim == 32
    a.encode_documents(["x"])
    b.encode_documents(["x"])
    assert b.texts_encoded == 1


def test_many_shards_are_merged(minilm, tmp_path, monkeypatch):
    import adapter.cache as cache

    monkeypatch.setattr(cache, "MAX_SHARDS", 3)
    enc = Encoder(minilm, cache_dir=tmp_path, show_progress=False)
    words = [f"valve {i}" for i in range(6)]
    vecs = [enc.encode_documents([w]) for w in words]
    assert len(list(enc.cache.folder.glob("*.shard"))) <= 3
    fresh = Encoder(minilm, cache_dir=tmp_path, show_progress=False)
    np.testing.assert_array_equal(fresh.encode_documents(words), np.vstack(vecs))
    assert fresh.texts_encoded == 0


def test_truncate_renormalises_without_touching_its_input():
    v = np.array([[3.0, 4.0, 12.0]], dtype=np.float32) / 13
    np.testing.assert_allclose(truncate(v, 2), [[0.6, 0.8]], rtol=1e-6)
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32) * 3  # not unit length
    before = x.copy()
    truncate(x, 8)  # full dimension: once a view that was renormalised in place
    np.testing.assert_array_equal(x, before)
    with pytest.raises(AdapterError, match="above"):
        truncate(v, 4)


def test_unknown_model_is_one_line(tmp_path):
    with pytest.raises(AdapterError, match="no-such-org/no-such-model: cannot load model"):
        load_model("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="not a sentence-transformers model folder"):
        load_model(str(tmp_path / "empty"))


def _count_encodes(monkeypatch) -> list[int]:
    from sentence_transformers import SentenceTransformer

    calls: list[int] = []
    real = SentenceTransformer.encode

    def counting(self, inputs, *args, **kwargs):
        calls.append(len(inputs))
        return real(self, inputs, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode", counting)
    return calls


def test_second_evaluate_embeds_nothing(tiny_dataset, tmp_path, monkeypatch):
    calls = _count_encodes(monkeypatch)
    args = ["evaluate", str(tiny_dataset), "--dims", "384,64", "--cache-dir", str(tmp_path / "c")]
    first = CliRunner().invoke(main, [*args, "--json", str(tmp_path / "a.json")])
    assert first.exit_code == 0, first.output
    assert sum(calls) == 7 + 6  # every query and chunk once
    calls.clear()
    second = CliRunner().invoke(main, [*args, "--json", str(tmp_path / "b.json")])
    assert second.exit_code == 0 and calls == []
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    r = CliRunner().invoke(main, ["embed", str(tiny_dataset), "--cache-dir", str(tmp_path / "c")])
    assert "0 texts embedded" in r.output and calls == []


def test_evaluate_cli_integration_with_minilm(tiny_dataset, tmp_path, minilm):
    """The bundled MiniLM on the tiny fixture: JSON shape, and equality with sentence-transformers' own evaluators
    (SequentialEvaluator of InformationRetrievalEvaluator with truncate_dim) on a fixture without near-ties."""
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
        SequentialEvaluator,
    )

    from tests.conftest import QUESTIONS

    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["evaluate", str(tiny_dataset), "--dims", "384,128", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "ndcg@10" in r.output and "dim 128" in r.output
    results = json.loads(out.read_text())
    assert list(results) == ["base"] and list(results["base"]) == ["384", "128"]
    evaluators = [InformationRetrievalEvaluator(
        queries={q: t for q, (t, _) in QUESTIONS.items()}, corpus=CHUNKS,
        relevant_docs={q: set(c) for q, (_, c) in QUESTIONS.items()}, truncate_dim=d, name=f"dim_{d}",
        write_csv=False) for d in (384, 128)]
    theirs = SequentialEvaluator(evaluators)(minilm)
    for d in (384, 128):
        for metric, value in results["base"][str(d)].items():
            assert value == pytest.approx(theirs[f"dim_{d}_cosine_{metric}"], abs=1e-9), (d, metric)
    assert results["base"]["384"]["accuracy@10"] == 1.0  # 6 chunks: every relevant chunk is in the top 10


@pytest.mark.parametrize("args, words", [
    (["--dims", "512"], "--dims: 512 is above the model's dimension 384"),
    (["--split", "dev"], "no qrels/dev.tsv"),
    (["--model", "no-such-org/no-such-model"], "cannot load model"),
])
def test_evaluate_bad_input(tiny_dataset, tmp_path, args, words):
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["evaluate", str(tiny_dataset), *args, "--json", str(out)])
    assert r.exit_code == 1 and words in r.output and r.output.count("\n") == 1, r.output
    assert not out.exists()


class _Bar:
    """Stands in for the progress bar: what it was asked to show, and each update."""

    def __init__(self, total: int, name: str, show: bool):
        self.total, self.show, self.updates = total, show, []

    def update(self, n: int) -> None:
        self.updates.append(n)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("n", [10, 150])  # below and above one part (batch 4 x 16 batches = 64 texts)
def test_progress_moves_per_batch_below_and_above_a_part(n, tiny_model_dir, tmp_path, monkeypatch):
    """Below a part sentence-transformers' own bar ran; above it ours moved once per part (minutes apart on a CPU at
    the default batch of 64). Now one bar, shown either way, moves after every batch."""
    import adapter.backends as backends

    bars: list[_Bar] = []
    monkeypatch.setattr(backends, "_progress", lambda *a: bars.append(_Bar(*a)) or bars[-1])
    shown: list[bool] = []
    model = load_model(str(tiny_model_dir))
    real = model.encode_document
    monkeypatch.setattr(model, "encode_document", lambda texts, **kw: shown.append(kw.get("show_progress_bar"))
                        or real(texts, **kw))
    enc = Encoder(model, cache_dir=tmp_path, batch_size=4)
    texts = [f"pipe {i} " + "valve " * (i % 7) for i in range(n)]
    vectors = enc.encode_documents(texts)
    assert len(bars) == 1 and bars[0].show and bars[0].total == n
    assert bars[0].updates == [4] * (n // 4) + ([n % 4] if n % 4 else [])  # one update per batch of 4
    assert not any(shown)  # sentence-transformers' own bar never shows beside it
    np.testing.assert_allclose(vectors, real(texts, normalize_embeddings=True), atol=1e-5)
