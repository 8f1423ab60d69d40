"""A query-LoRA file at the command line's `search`: the query through the LoRA's adapted encoder, the store (base
vectors, never re-embedded) searched with it; and the one-line refusals that come with it."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from cli import main
from tests.conftest import CHUNKS

QUERY = "who fixes a broken pipe in the street"


def test_search_through_a_lora_matches_brute_force(tmp_path, tiny_model, tiny_model_dir, lora_files):
    from adapter.config import Config
    from adapter.lora import QueryLora
    from adapter.pipeline import search
    from adapter.stores import open_store, write_index

    docs = tiny_model.encode_document(list(CHUNKS.values()), normalize_embeddings=True)
    idx = write_index(docs, tmp_path / "base.faiss")
    q = QueryLora.load(lora_files[0]).encode_queries([QUERY], tiny_model)[0]
    scores = docs @ q
    assert list(np.argsort(-scores)) != list(np.argsort(-(docs @ tiny_model.encode_query(
        [QUERY], normalize_embeddings=True)[0])))  # the LoRA reorders the results: the test can tell
    args = ["search", "--store", f"faiss:{idx}", "--adapter", str(lora_files[0]), "--model", str(tiny_model_dir),
            "-k", "4", "--json", QUERY]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    got = json.loads(r.output.strip().splitlines()[-1])
    assert got["ids"] == [int(i) for i in np.argsort(-scores, kind="stable")[:4]]
    np.testing.assert_allclose(got["scores"], np.sort(scores)[::-1][:4], rtol=1e-4, atol=1e-5)
    cfg = Config().replace(**{"encoder.model": str(tiny_model_dir), "store.k": 2})
    with open_store(index=str(idx), cfg=cfg) as store:
        hits = search([QUERY], store, QueryLora.load(lora_files[0]), cfg)[0]  # a loaded LoRA too
    assert [int(i) for i in hits.ids] == got["ids"][:2]


def test_search_with_a_lora_refuses_another_model_in_one_line(tmp_path, lora_files):
    from adapter.stores import write_index

    idx = write_index(np.eye(384, dtype=np.float32)[:3], tmp_path / "minilm.faiss")
    r = CliRunner().invoke(main, ["search", "--store", f"faiss:{idx}", "--adapter", str(lora_files[0]), QUERY])
    assert r.exit_code == 1 and "--allow-other-model" in r.output and r.output.count("\n") == 1, r.output
