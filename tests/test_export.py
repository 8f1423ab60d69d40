"""The sentence-transformers export: a Router model whose encode_query applies the adapter and whose encode_document
is the untouched base, loaded back offline; and the folder a push to the Hub would upload."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from adapter.errors import AdapterError
from adapter.model import LinearAdapter
from cli import main
from tests.conftest import CHUNKS, QUESTIONS, split_tiny
from tests.test_index import random_adapter

TEXTS = [q for q, _ in QUESTIONS.values()]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny BERT, its identity, and a full and a low-rank adapter for it with validation metrics."""
    from adapter.encoder import Encoder

    enc = Encoder(str(tiny_model_dir), show_progress=False)
    adapters = {}
    for rank in (None, 4):
        a = random_adapter(enc.dim, enc.identity, rank=rank)
        a.metadata = {"base_model_name": str(tiny_model_dir), "trained_on": "train", "data_fingerprint": "f" * 16,
                      "best_epoch": 7, "validation": "0.1 of train by query",
                      "val_base": {enc.dim: {"ndcg@10": 0.4, "mrr@10": 0.3}},
                      "val_best": {enc.dim: {"ndcg@10": 0.5, "mrr@10": 0.25}},
                      "config": {"train": {"loss": "triplet", "epochs": 30, "rank": rank}, "seed": 0}}
        adapters[rank] = a
    return enc, adapters


@pytest.mark.parametrize("rank", [None, 4])
def test_export_round_trip(tmp_path, tiny, tiny_model_dir, rank):
    from sentence_transformers import SentenceTransformer

    from adapter.export import export

    enc, adapters = tiny
    path = adapters[rank].save(tmp_path / "a.safetensors")
    out = export(path, tmp_path / "model", model=str(tiny_model_dir))
    loaded = SentenceTransformer(str(out), local_files_only=True)  # offline, from the folder alone
    assert type(loaded[0]).__name__ == "Router"
    base = enc.model
    by_hand = LinearAdapter.load(path).apply(base.encode_query(TEXTS, normalize_embeddings=True))
    np.testing.assert_allclose(loaded.encode_query(TEXTS), by_hand, atol=1e-5)
    docs = list(CHUNKS.values())
    np.testing.assert_allclose(loaded.encode_document(docs), base.encode_document(docs), atol=1e-6)
    np.testing.assert_allclose(loaded.encode(docs), base.encode(docs), atol=1e-6)  # plain encode: the base
    assert not np.allclose(loaded.encode_query(TEXTS), base.encode_query(TEXTS, normalize_embeddings=True), atol=1e-3)
    card = (out / "README.md").read_text()
    assert "| ndcg@10 | 0.4000 | 0.5000 | +25.0% |" in card and "| mrr@10 | 0.3000 | 0.2500 | -16.7% |" in card
    assert ("rank 4" in card) == (rank == 4) and "encode_query" in card
    assert (out / "adapter.safetensors").read_bytes() == path.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_exported_model_scores_like_base_plus_adapter(tmp_path, tiny, tiny_model_dir, tiny_dataset):
    """The judge sees the same system either way: base with the adapter file, or the exported model alone."""
    from adapter.config import Config
    from adapter.data import load_dataset
    from adapter.encoder import Encoder
    from adapter.export import export
    from adapter.pipeline import evaluate_dataset

    enc, adapters = tiny
    path = adapters[None].save(tmp_path / "a.safetensors")
    out = export(path, tmp_path / "model", model=str(tiny_model_dir))
    ds = load_dataset(tiny_dataset)
    cfg = Config().replace(dims=(32,))
    by_file = evaluate_dataset(ds, cfg, encoder=enc, adapters={"a": adapters[None]})["a"][32]
    exported = evaluate_dataset(ds, cfg, encoder=Encoder(str(out), show_progress=False))["base"][32]
    assert exported == pytest.approx(by_file, abs=1e-6)


def test_export_cli(tmp_path, tiny, tiny_model_dir, minilm):
    enc, adapters = tiny
    path = adapters[None].save(tmp_path / "a.safetensors")
    out = tmp_path / "model"
    args = ["export", str(path), "--out", str(out), "--model", str(tiny_model_dir)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and f"wrote {out}" in r.output, r.output
    stamp = (out / "modules.json").stat().st_mtime_ns
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "already exists; pass --force" in r.output and r.output.count("\n") == 1
    assert (out / "modules.json").stat().st_mtime_ns == stamp
    r = CliRunner().invoke(main, [*args, "--force"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["export", str(path), "--out", str(tmp_path / "other")])  # MiniLM: wrong base
    assert r.exit_code == 1 and "--allow-other-model" in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "other").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "model"]


def test_push_to_hub_uploads_the_exported_folder(tmp_path, tiny, tiny_model_dir, monkeypatch):
    """No network here: the Hub calls are replaced, and what they were given is checked."""
    import huggingface_hub
    from sentence_transformers import SentenceTransformer

    calls = {}
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.setdefault("create", (repo_id, kw, self.token)) and
                        f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.setdefault("upload", kw))
    enc, adapters = tiny
    path = adapters[4].save(tmp_path / "a.safetensors")
    out = tmp_path / "model"
    r = CliRunner().invoke(main, ["export", str(path), "--out", str(out), "--model", str(tiny_model_dir),
                                  "--push-to-hub", "me/water-adapter"])
    assert r.exit_code == 0, r.output
    assert "pushed" in r.output and "https://huggingface.co/me/water-adapter" in r.output
    assert calls["create"][0] == "me/water-adapter" and calls["create"][2] == "hf_test_token"
    upload = calls["upload"]
    assert upload["repo_id"] == "me/water-adapter" and upload["folder_path"] == str(out)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"modules.json", "README.md", "adapter.safetensors", "router_config.json"} <= files
    loaded = SentenceTransformer(upload["folder_path"], local_files_only=True)
    np.testing.assert_allclose(loaded.encode_query(TEXTS[:2]), LinearAdapter.load(path).apply(
        enc.model.encode_query(TEXTS[:2], normalize_embeddings=True)), atol=1e-5)


def test_push_to_hub_refuses_without_a_token_or_offline(tmp_path, tiny, tiny_model_dir, monkeypatch):
    import huggingface_hub

    from adapter.export import export
    from adapter.hub import push_to_hub

    enc, adapters = tiny
    out = export(adapters[None].save(tmp_path / "a.safetensors"), tmp_path / "model", model=str(tiny_model_dir))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(AdapterError, match="cannot push while HF_HUB_OFFLINE is set"):
        push_to_hub(out, "me/x")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(AdapterError, match="no Hugging Face token"):
        push_to_hub(out, "me/x")
    with pytest.raises(AdapterError, match="not a sentence-transformers model folder"):
        push_to_hub(tmp_path, "me/x", token="t")
    assert json.loads((out / "modules.json").read_text())[0]["type"].endswith("Router")


# ---------------------------------------------------------------------------------------------------------- tiny files


def test_default_loss_is_triplet_for_full_and_infonce_for_low_rank(tmp_path, minilm):
    from adapter.choice import resolve_loss, train_adapter
    from adapter.config import Config
    from adapter.data import load_dataset
    from adapter.encoder import Encoder

    assert Config().train.loss == "auto"
    assert resolve_loss(Config()).train.loss == "triplet"
    assert resolve_loss(Config().replace(rank=16)).train.loss == "infonce"
    # a loss given by name is kept
    assert resolve_loss(Config().replace(rank=16, train={"loss": "triplet"})).train.loss == "triplet"
    folder = split_tiny(tmp_path / "ds")
    enc = Encoder(minilm, show_progress=False)
    for rank, loss in ((None, "triplet"), (16, "infonce")):
        cfg = Config().replace(train={"rank": rank, "epochs": 1})
        r = train_adapter(load_dataset(folder), cfg, encoder=enc, progress=False)
        assert r.adapter.metadata["config"]["train"]["loss"] == loss  # the file records the loss that ran


def test_rank_16_float16_file_is_at_most_30_kb(tmp_path, minilm):
    """With every piece of metadata a default run writes (30 epochs of history, the whole resolved config)."""
    from adapter.choice import train_adapter
    from adapter.config import Config
    from adapter.data import load_dataset
    from adapter.encoder import Encoder

    folder = split_tiny(tmp_path / "ds")
    cfg = Config().replace(rank=16, dtype="float16")
    r = train_adapter(load_dataset(folder), cfg, encoder=Encoder(minilm, show_progress=False), progress=False)
    assert len(r.adapter.metadata["history"]["val"]) == cfg.train.epochs + 1
    path = r.adapter.save(tmp_path / "tiny.safetensors", dtype=cfg.train.dtype)
    assert path.stat().st_size <= 30_000, path.stat().st_size
    back = LinearAdapter.load(path)
    assert back.U.dtype == np.float16 and back.rank == 16 and back.metadata["config"]["train"]["dtype"] == "float16"


# ------------------------------------------------------------------------------------------------------- query LoRA


def test_export_lora_round_trip(tmp_path, tiny_model, tiny_model_dir, lora_files):
    """A LoRA file exports to a Router whose query route is the merged encoder (QueryLora.encode_queries exactly)
    and whose document route is the untouched base; every module is sentence-transformers' own."""
    from sentence_transformers import SentenceTransformer

    from adapter.export import export
    from adapter.lora import QueryLora

    out = export(lora_files[0], tmp_path / "model", model=str(tiny_model_dir))
    loaded = SentenceTransformer(str(out), local_files_only=True)
    by_file = QueryLora.load(lora_files[0]).encode_queries(TEXTS, tiny_model)
    np.testing.assert_allclose(loaded.encode_query(TEXTS), by_file, atol=1e-5)
    docs = list(CHUNKS.values())
    np.testing.assert_allclose(loaded.encode_document(docs), tiny_model.encode_document(docs), atol=1e-6)
    assert not np.allclose(by_file, tiny_model.encode_query(TEXTS, normalize_embeddings=True), atol=1e-3)
    router = json.loads((out / "router_config.json").read_text())
    assert all(t.startswith("sentence_transformers.") for t in router["types"].values())  # no code of this project
    assert not set(router["structure"]["query"]) & set(router["structure"]["document"])  # two encoders
    card = (out / "README.md").read_text()
    assert "query-side LoRA" in card and "rank 4" in card and "twice" in card and "linear adapter" not in card
    assert (out / "adapter.safetensors").read_bytes() == lora_files[0].read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_adapted_encoder_takes_either_form(tiny_model, tiny_model_dir, lora_files, tiny):
    from adapter.export import AdaptedEncoder
    from adapter.lora import QueryLora

    enc = AdaptedEncoder(lora_files[1], str(tiny_model_dir))
    np.testing.assert_allclose(enc.encode_query(TEXTS), QueryLora.load(lora_files[1]).encode_queries(TEXTS, tiny_model),
                               atol=1e-5)
    np.testing.assert_allclose(enc.encode_document(TEXTS), tiny_model.encode_document(TEXTS, normalize_embeddings=True),
                               atol=1e-6)
    linear = AdaptedEncoder(tiny[1][None], tiny_model)
    np.testing.assert_allclose(linear.encode_query(TEXTS), tiny[1][None].apply(
        tiny_model.encode_query(TEXTS, normalize_embeddings=True)), atol=1e-6)


def test_export_cli_takes_a_lora_and_refuses_another_model(tmp_path, tiny_model_dir, lora_files):
    out = tmp_path / "model"
    r = CliRunner().invoke(main, ["export", str(lora_files[0]), "--out", str(out), "--model", str(tiny_model_dir)])
    assert r.exit_code == 0 and f"wrote {out}" in r.output, r.output
    assert (out / "router_config.json").is_file()
    r = CliRunner().invoke(main, ["export", str(lora_files[0]), "--out", str(tmp_path / "other")])  # MiniLM
    assert r.exit_code == 1 and "--allow-other-model" in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "other").exists()
