"""Shared fixtures: offline settings, a private embedding cache, the tiny dataset folders (whole, split by query, with
train and test splits), the bundled MiniLM and a tiny BERT built locally; and ``tree``, to prove files untouched."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
APPLEQA = SHARED / "data" / "appleqa" / "apple_QA_dataset.json"

# A small corpus in the sample domain, with questions whose answers are unambiguous.
CHUNKS = {
    "burst": "A burst water main is isolated by closing the two nearest sluice valves, then the crew repairs the pipe.",
    "hydrant": "Hydrants are inspected every year; a hydrant that will not open is tagged and reported to the depot.",
    "chlorine": "Free chlorine at the reservoir outlet must stay between 0.2 and 0.5 milligrams per litre.",
    "meter": "Smart meters send hourly readings; a reading gap longer than three days triggers a site visit.",
    "sewer": "When a sewage pumping station alarms for high wet well level, the standby pump starts automatically.",
    "lead": "Homes built before 1970 may have a lead service pipe; we replace it free when the customer asks.",
}
QUESTIONS = {
    "q_burst": ("how do you shut off a broken water pipe", ["burst"]),
    "q_hydrant": ("fire hydrant stuck and won't open, who do i tell", ["hydrant"]),
    "q_chlorine": ("what chlorine level should leave the reservoir", ["chlorine"]),
    "q_meter": ("my smart meter stopped sending readings for days", ["meter"]),
    "q_sewer": ("what happens when the pumping station wet well is too high", ["sewer"]),
    "q_lead": ("is there lead in the pipes of an old house", ["lead"]),
    "q_water": ("water pipe repair and chlorine after it", ["burst", "chlorine"]),
}


def write_dataset(folder: Path, splits: dict[str, list[str]] | None = None) -> Path:
    """Write the tiny dataset as a dataset folder; ``splits`` maps split name -> query ids."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for cid, text in CHUNKS.items():
            f.write(json.dumps({"_id": cid, "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for qid, (text, _) in QUESTIONS.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    for name, qids in {"all": list(QUESTIONS), **(splits or {})}.items():
        with open(folder / "qrels" / f"{name}.tsv", "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for qid in qids:
                for cid in QUESTIONS[qid][1]:
                    f.write(f"{qid}\t{cid}\t1\n")
    return folder


def split_tiny(folder: Path) -> Path:
    """The tiny dataset written to ``folder`` and split by query (30% test, seed 0): what most trained fixtures use."""
    from adapter.data import split_dataset

    write_dataset(folder)
    split_dataset(folder, by="query", test_fraction=0.3, seed=0)
    return folder


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes: to prove nothing was touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test run gets its own embedding cache, so no test sees vectors from outside."""
    os.environ["ADAPTER_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """The tiny dataset with a test split holding every query."""
    return write_dataset(tmp_path / "ds", {"test": list(QUESTIONS)})


@pytest.fixture
def train_dir(tmp_path: Path) -> Path:
    """The tiny dataset with a train split holding every query (what the trainers of the wings read)."""
    return write_dataset(tmp_path / "ds", {"train": list(QUESTIONS)})


@pytest.fixture
def train_test_dir(tmp_path: Path) -> Path:
    """The tiny dataset with train and test splits both holding every query."""
    return write_dataset(tmp_path / "ds", {"train": list(QUESTIONS), "test": list(QUESTIONS)})


@pytest.fixture
def backoff_delays(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every wait the retry loop asks for before a retry, in seconds, in order: what a test checks instead of timing
    the gap between two requests on a clock the machine's load moves."""
    import adapter.resilience

    delays: list[float] = []
    real = adapter.resilience.backoff_delay

    def recorded(*args: float) -> float:
        delays.append(real(*args))
        return delays[-1]

    monkeypatch.setattr(adapter.resilience, "backoff_delay", recorded)
    return delays


@pytest.fixture(scope="session")
def minilm():
    """The bundled all-MiniLM-L6-v2, loaded once per session."""
    from adapter.encoder import load_model

    return load_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with a WordPiece tokenizer trained here on a few sentences, saved as a sentence-transformers
    model folder: a real model of another name and dimension, built without the network."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def build_tiny_model(root: Path) -> Path:
    """Build the tiny BERT of ``tiny_model_dir`` under ``root`` (also used by bench/bench_faults.py)."""
    root.mkdir(parents=True, exist_ok=True)
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers import models as tmodels
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tok = Tokenizer(tmodels.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([*CHUNKS.values(), *(q for q, _ in QUESTIONS.values())],
                            trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    hf_dir = root / "hf"
    hf_dir.mkdir()
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(hf_dir)
    import torch

    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(hf_dir)
    word = models.Transformer(str(hf_dir), max_seq_length=64)
    model = SentenceTransformer(modules=[word, models.Pooling(word.get_embedding_dimension(), "mean")])
    out = root / "tiny-bert"
    model.save(str(out))
    return out


def random_lora(model, name: str, seed: int = 0, r: int = 4):
    """A ``QueryLora`` for ``model`` (a loaded sentence-transformers model named ``name``) with seeded non-zero
    factors (B = 0 would be the base exactly), on every layer: a LoRA file's content without a training run."""
    import torch

    from adapter.backends import make_backend
    from adapter.config import LoraConfig
    from adapter.lora import QueryLora, lora_settings, lora_tensors, with_lora

    settings = lora_settings(LoraConfig(top_layers=None), model)
    carrying = with_lora(model, r, settings, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in carrying.named_parameters():
            if "lora_B" in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    identity = make_backend(model, show_progress=False).identity
    return QueryLora(int(model.get_embedding_dimension()), identity, r, settings, lora_tensors(carrying),
                     metadata={"base_model_name": name})


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    """The tiny BERT, loaded once per session (on the CPU)."""
    from adapter.backends import load_model

    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def lora_files(tiny_model, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Two query-LoRA files (seeds 0 and 1) for the tiny BERT, written once per session: seed -> path."""
    folder = tmp_path_factory.mktemp("lora")
    return {seed: random_lora(tiny_model, str(tiny_model_dir), seed).save(folder / f"lora{seed}.safetensors")
            for seed in (0, 1)}
