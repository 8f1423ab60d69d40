"""The query-side LoRA experiment (bench/query_lora.py, issue #26) on the tiny BERT and the tiny dataset: B = 0 is the
base exactly, training lowers the loss, the file round-trips, and the fit never encodes a document."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the experiment lives beside its benchmark

from query_lora import (  # noqa: E402
    LoraTrainConfig,
    encode_queries,
    fit_query_lora,
    load_query_lora,
    merged,
    read_query_lora,
    save_query_lora,
    with_lora,
)

from tests.conftest import CHUNKS, QUESTIONS  # noqa: E402

CFG = LoraTrainConfig(rank=4, epochs=3, lr=5e-3, batch_size=4)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    from adapter.backends import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def data(tiny):
    """Query texts, qrels, corpus ids and the corpus vectors (encoded once, before any fit, as a cache holds them)."""
    queries = {q: t for q, (t, _) in QUESTIONS.items()}
    qrels = {q: {c: 1 for c in cs} for q, (_, cs) in QUESTIONS.items()}
    cids = list(CHUNKS)
    corpus = np.asarray(tiny.encode_document([CHUNKS[c] for c in cids], normalize_embeddings=True), dtype=np.float32)
    return queries, qrels, cids, corpus


def test_untrained_lora_is_the_base_exactly(tiny, data):
    queries = list(data[0].values())
    base = encode_queries(tiny, queries)
    lora = with_lora(tiny, CFG)
    assert any("lora_A" in n for n, _ in lora.named_parameters())
    np.testing.assert_array_equal(encode_queries(lora, queries), base)
    np.testing.assert_array_equal(encode_queries(merged(lora), queries), base)


def test_training_lowers_the_loss_and_never_encodes_documents(tiny, data, monkeypatch):
    queries, qrels, cids, corpus = data
    calls = []
    for name in ("encode_document", "encode_corpus"):
        if hasattr(type(tiny), name):
            original = getattr(type(tiny), name)

            def counted(self, *a, _o=original, **k):
                calls.append(a)
                return _o(self, *a, **k)

            monkeypatch.setattr(type(tiny), name, counted)
    result = fit_query_lora(tiny, queries, qrels, corpus, cids, cfg=CFG, base_model="tiny")
    assert calls == []
    losses = [h["loss"] for h in result.history[1:]]
    assert losses[-1] < losses[0]
    assert result.best_epoch == CFG.epochs  # no validation: the last epoch is kept
    moved = encode_queries(result.model, list(queries.values()))
    assert not np.allclose(moved, encode_queries(tiny, list(queries.values())))


def test_saved_file_round_trips(tiny, data, tmp_path):
    queries, qrels, cids, corpus = data
    result = fit_query_lora(tiny, queries, qrels, corpus, cids, val=qrels, cfg=CFG, base_model="tiny")
    path = save_query_lora(result, tmp_path / "q.safetensors")
    header, tensors = read_query_lora(path)
    assert header["form"] == "lora" and header["rank"] == CFG.rank and header["best_epoch"] == result.best_epoch
    assert all("lora_" in k for k in tensors)
    texts = list(queries.values())
    want = encode_queries(result.model, texts)
    np.testing.assert_allclose(encode_queries(load_query_lora(path, tiny), texts), want, atol=1e-5)
    np.testing.assert_allclose(encode_queries(load_query_lora(path, tiny, merge=False), texts), want, atol=1e-6)
    with pytest.raises(Exception, match="exists"):
        save_query_lora(result, path)


def test_validation_keeps_the_base_when_no_epoch_beats_it(tiny, data):
    queries, qrels, cids, corpus = data
    # a learning rate of zero moves nothing, so no epoch beats the base: epoch 0 (B = 0) is kept
    result = fit_query_lora(tiny, queries, qrels, corpus, cids, val=qrels,
                            cfg=LoraTrainConfig(rank=4, epochs=1, lr=0.0, batch_size=4))
    assert result.best_epoch == 0
    texts = list(queries.values())
    np.testing.assert_array_equal(encode_queries(result.model, texts), encode_queries(tiny, texts))
