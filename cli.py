"""The `adapter` command line: parse options, call one library function, print. No logic lives here."""

from __future__ import annotations

import functools
import logging
import math
import os
import sys

import click

from adapter.config import ADAPTER_DTYPES, CHUNK_UNITS, DEMO_OUT, LOSSES, NEGATIVES, SPLIT_BY, Config
from adapter.data import FORMATS
from adapter.errors import AdapterError, RedactingFilter, redact, refuse_existing

logger = logging.getLogger("adapter")
NO_CHANGE = "base scored 0: no relative change"  # a base scoring 0 on hard data is no reason to crash
DEFAULTS = Config()  # for the [default: ...] of each option's help; the values themselves live in adapter/config.py


def _dims(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 384,256,128,64, got {value!r}") from None


class Number(click.ParamType):
    """An int or a finite float within bounds, checked while the command line is parsed: before any model is loaded
    or any text embedded. NaN and infinities are refused (click's FloatRange lets NaN through)."""

    def __init__(self, kind: type = float, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False):
        self.kind, self.low, self.high, self.low_open = kind, low, high, low_open
        self.name = kind.__name__

    def _bounds(self) -> str:
        low = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = "" if self.high is None else f"<= {self.high:g}"
        return " and ".join(b for b in (low, high) if b)

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = self.kind(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not {'an integer' if self.kind is int else 'a number'}", param, ctx)
        if isinstance(number, float) and not math.isfinite(number):
            self.fail(f"must be a finite number, got {value}", param, ctx)
        below = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        if below or (self.high is not None and number > self.high):
            self.fail(f"must be {self._bounds()}, got {value}", param, ctx)
        return number


POSITIVE = Number(float, 0, low_open=True)  # learning rates, temperatures, margins, timeouts
COUNT = Number(int, 1)  # epochs of a fine-tune, batch sizes, k, probes
SEED = Number(int, 0, 2**32 - 1)  # what numpy and torch both accept


class _Group(click.Group):
    """Turns AdapterError into one line on stderr and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AdapterError as e:
            click.echo(f"Error: {redact(str(e))}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
@click.option("-q", "--quiet", is_flag=True, help="Log warnings only.")
def main(verbose: bool, quiet: bool) -> None:
    """Make retrieval better on your own data without rebuilding your vector index."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:  # every line logged to the terminal, secrets masked
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    for noisy in ("sentence_transformers", "transformers", "httpx", "httpx2", "openai", "faiss", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


model_option = click.option("--model", default=None, help="Sentence-transformers model name or path, or "
                            "openai:NAME for any OpenAI-compatible /v1/embeddings (see --embedding-base-url) "
                            f"[default: {DEFAULTS.encoder.model}].")

EMBEDDING_OPTIONS = [  # (flat config name, option); collected into one ``embedding`` dict by ``embedding_options``
    ("embedding_base_url", click.option(
        "--embedding-base-url", default=None, metavar="URL", help="OpenAI-compatible server for --model openai:NAME, "
        "e.g. http://localhost:8080/v1 (TEI, vLLM, Ollama, LiteLLM) [default: $OPENAI_BASE_URL, else OpenAI].")),
    ("embedding_api_key_env", click.option(
        "--embedding-api-key-env", default=None, metavar="VAR", help="Environment variable holding the API key "
        f"(the key itself is never a flag) [default: {DEFAULTS.embedding.api_key_env}].")),
    ("embedding_dimensions", click.option(
        "--embedding-dimensions", type=COUNT, default=None, metavar="N",
        help="Ask an openai: model for N-dimensional vectors (text-embedding-3-*) [default: the model's own].")),
    ("embedding_query_prefix", click.option(
        "--query-prefix", "embedding_query_prefix", default=None, metavar="TEXT",
        help="Prepended to every query, e.g. 'query: ' for e5 [default: the model's own prompt].")),
    ("embedding_document_prefix", click.option(
        "--document-prefix", "embedding_document_prefix", default=None, metavar="TEXT",
        help="Prepended to every chunk, e.g. 'passage: ' for e5 [default: the model's own prompt].")),
    ("embedding_batch_size", click.option(
        "--embedding-batch-size", type=COUNT, default=None, metavar="N",
        help=f"Texts per request to an openai: model [default: {DEFAULTS.embedding.batch_size}].")),
    ("embedding_concurrency", click.option(
        "--embedding-concurrency", type=COUNT, default=None, metavar="N",
        help=f"Embedding requests in flight [default: {DEFAULTS.embedding.concurrency}].")),
    ("embedding_requests_per_minute", click.option(
        "--embedding-rpm", "embedding_requests_per_minute", type=POSITIVE, default=None, metavar="N",
        help=f"Embedding requests per minute [default: {DEFAULTS.embedding.requests_per_minute:g}].")),
    ("embedding_tokens_per_minute", click.option(
        "--embedding-tpm", "embedding_tokens_per_minute", type=POSITIVE, default=None, metavar="N",
        help=f"Embedding tokens per minute [default: {DEFAULTS.embedding.tokens_per_minute:g}].")),
    ("embedding_request_timeout", click.option(
        "--embedding-timeout", "embedding_request_timeout", type=POSITIVE, default=None, metavar="S",
        help=f"Seconds per embedding request [default: {DEFAULTS.embedding.request_timeout:g}].")),
    ("processes", click.option(
        "--processes", type=COUNT, default=None, metavar="N", help="Embed with N CPU worker processes of a local "
        "model (sentence-transformers' multi-process pool, cores/N torch threads each), for jobs of at least "
        f"{DEFAULTS.encoder.pool_min_texts} new texts; smaller jobs stay in one process [default: 1].")),
    ("devices", click.option(
        "--devices", default=None, metavar="LIST", callback=lambda _ctx, _p, v: tuple(v.split(",")) if v else None,
        help="Embed with one worker process of a local model per torch device, e.g. cuda:0,cuda:1, for jobs of at "
        f"least {DEFAULTS.encoder.pool_min_texts} new texts (one device: the model runs there) [default: one "
        "process].")),
]


def embedding_options(f):
    """The embedding backend's options, handed to the command as one ``embedding`` dict of flat config names."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, embedding={name: kwargs.pop(name) for name, _ in EMBEDDING_OPTIONS}, **kwargs)

    for _, option in reversed(EMBEDDING_OPTIONS):
        wrapper = option(wrapper)
    return wrapper
cache_option = click.option("--cache-dir", default=None, help="Embedding cache folder [default: $ADAPTER_CACHE, "
                            "else $XDG_CACHE_HOME/adapter, else ~/.cache/adapter].")


def _quiet_hf() -> None:
    """Hide transformers' weight-loading bar: noise on every command that loads a model."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _encoder(cfg: Config, *, show_progress: bool = True):
    from adapter.encoder import Encoder

    _quiet_hf()
    return Encoder.from_config(cfg, show_progress=show_progress)


@main.command()
@click.option("--out", default=DEMO_OUT, show_default=True, type=click.Path(file_okay=False),
              help="Folder for the split data, the adapter and the report (a previous demo's is replaced).")
@click.option("--with-finetune", is_flag=True, help="Also fine-tune the encoder (one short CPU epoch) and compare.")
@model_option
@cache_option
def demo(out: str, with_finetune: bool, model: str | None, cache_dir: str | None) -> None:
    """The whole story on the bundled water-utility handbook: base against adapter (and fine-tune), every dim."""
    from adapter.demo import run_demo
    from adapter.report import format_table

    _quiet_hf()
    r = run_demo(out, Config().replace(model=model, cache_dir=cache_dir), with_finetune=with_finetune)
    click.echo(format_table(r.comparison.results, metrics=("ndcg@10", "accuracy@1", "accuracy@10")))
    click.echo(f"adapter: {r.adapter} ({r.adapter.stat().st_size / 1024:.0f} KiB); apply it to query vectors only")
    from adapter.model import LinearAdapter, estimates_line

    click.echo(f"adapter: {estimates_line(LinearAdapter.load(r.adapter).metadata)}")
    if r.finetuned:
        click.echo(f"fine-tuned model: {r.finetuned}")
    click.echo(f"report: {r.report} (with plots and results.json beside it); took {r.seconds:.0f} s")


@main.command()
@click.argument("src", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Dataset folder to write.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Source format [default: detect from the content].")
@click.option("--keep-split", is_flag=True, help="Keep the sources' split as given: SRC train, test (or train, dev, "
              "test) become qrels/train.tsv, test.tsv (dev.tsv) beside all.tsv.")
@click.option("--drop-empty", is_flag=True, help="Drop chunks with an empty text, with their questions, and empty "
              "questions, saying what was dropped [default: stop at the first].")
@click.option("--force", is_flag=True, help="Replace a dataset already in --out.")
def convert(src: tuple[str, ...], out: str, fmt: str | None, keep_split: bool, drop_empty: bool,
            force: bool) -> None:
    """Convert SRC (chunks JSON or JSON Lines, LlamaIndex JSON, pairs CSV or JSON Lines, or a BEIR folder; several
    are merged into one dataset) into a dataset folder."""
    from adapter.data import convert as run

    detected = fmt is None
    ds, fmt = run(src, out, fmt=fmt, force=force, drop_empty=drop_empty, keep_split=keep_split)
    n_pairs = sum(len(r) for r in ds.qrels["all"].values())
    click.echo(f"{'detected' if detected else 'format'}: {fmt}")
    given = ", ".join(f"{len(ds.qrels[s])} {s}" for s in ("train", "dev", "test") if s in ds.qrels)
    click.echo(f"wrote {out}: {len(ds.corpus)} chunks, {len(ds.queries)} queries, {n_pairs} qrels"
               + (f"; split as given: {given} queries" if given else ""))


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--by", type=click.Choice(SPLIT_BY), default=None,
              help=f"Hold out random queries or whole chunks [default: {DEFAULTS.split.by}].")
@click.option("--test-fraction", type=float, default=None, help=f"[default: {DEFAULTS.split.test_fraction}]")
@click.option("--dev-fraction", type=float, default=None, help=f"[default: {DEFAULTS.split.dev_fraction}]")
@click.option("--seed", type=SEED, default=None, help=f"[default: {DEFAULTS.seed}]")
@click.option("--force", is_flag=True, help="Replace a split already in DIRECTORY.")
def split(directory: str, by: str | None, test_fraction: float | None, dev_fraction: float | None,
          seed: int | None, force: bool) -> None:
    """Split DIRECTORY's qrels/all.tsv into train/test (and dev) qrels."""
    from adapter.data import split_dataset

    cfg = Config().replace(split_by=by, test_fraction=test_fraction, dev_fraction=dev_fraction, seed=seed)
    s = split_dataset(directory, cfg, force=force)
    counts = ", ".join(f"{n} {name}" for name, n in s["queries"].items() if n)
    n_dropped = s["dropped_queries"]
    dropped = f"; {n_dropped} queries dropped (relevant chunks on both sides)" if n_dropped else ""
    click.echo(f"split {directory} by {cfg.split.by} (seed {cfg.seed}): {counts} queries{dropped}")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@model_option
@cache_option
@embedding_options
def embed(directory: str, model: str | None, cache_dir: str | None, embedding: dict) -> None:
    """Embed every query and chunk of DIRECTORY into the on-disk cache (only texts not cached yet)."""
    from adapter.data import load_dataset
    from adapter.pipeline import embed_dataset

    cfg = Config().replace(model=model, cache_dir=cache_dir, **embedding)
    ds = load_dataset(directory)
    enc = _encoder(cfg)
    embed_dataset(ds, enc)
    total = len(ds.queries) + len(ds.corpus)
    click.echo(f"{enc.identity}: {enc.texts_encoded} texts embedded, {total - enc.texts_encoded} already cached")


STORE_OPTIONS = [  # (name, option); collected into one ``source`` (adapter.corpus.StoreSource) by store_options
    ("index", click.option("--index", "index", type=click.Path(dir_okay=False), default=None, help="FAISS index file "
                           "(flat, IVF, PQ or HNSW; ids as stored, or row i = line i of corpus.jsonl).")),
    ("qdrant", click.option("--qdrant", default=None, metavar="PATH_OR_URL",
                            help="Qdrant local folder or server URL (key in $QDRANT_API_KEY); needs adapter[qdrant].")),
    ("chroma", click.option("--chroma", default=None, metavar="PATH_OR_URL",
                            help="Chroma folder (embedded) or server URL; needs adapter[chroma].")),
    ("collection", click.option("--collection", default=None, metavar="NAME",
                                help="Collection name, with --qdrant or --chroma.")),
    ("pgvector", click.option("--pgvector", default=None, metavar="DSN", help="PostgreSQL with pgvector, e.g. "
                              "postgresql://user@host/db (password: $PGPASSWORD or the DSN); needs "
                              "adapter[pgvector].")),
    ("table", click.option("--table", default=None, metavar="NAME",
                           help="Table with a vector column, with --pgvector.")),
    ("vectors", click.option("--corpus-vectors", "vectors", type=click.Path(dir_okay=False), default=None,
                             metavar="FILE", help="Corpus vectors: VECTORS.npy (with --corpus-ids) or a .parquet file "
                             "with id and vector columns.")),
    ("ids", click.option("--corpus-ids", "ids", type=click.Path(dir_okay=False), default=None, metavar="IDS.txt",
                         help="Corpus id of each row of --corpus-vectors VECTORS.npy, one per line.")),
]
ID_FIELD_OPTION = click.option("--id-field", default=None, metavar="FIELD", help="Qdrant payload / Chroma metadata "
                               "field, or pgvector column, holding corpus ids [default: the point ids; pgvector: the "
                               "primary key].")


def store_options(f):
    """Where the existing index lives (a store, or a vector file), handed over as one ``source``: a StoreSource."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from adapter.corpus import StoreSource

        return f(*args, source=StoreSource(**{name: kwargs.pop(name) for name, _ in STORE_OPTIONS}), **kwargs)

    for _, option in reversed(STORE_OPTIONS):
        wrapper = option(wrapper)
    return ID_FIELD_OPTION(wrapper)


def rerank_options(f):
    """--reranker DIR and --rerank-k N: a cross-encoder second stage on every system."""
    f = click.option("--rerank-k", type=int, default=None, help="First-stage candidates the reranker reorders "
                     f"[default: {DEFAULTS.rerank.k}].")(f)
    return click.option("--reranker", "reranker_dir", type=click.Path(file_okay=False), default=None,
                        help="Cross-encoder folder (from `adapter rerank-train`): each system is also scored with its "
                             "top --rerank-k reordered, as '<system>+rerank'.")(f)


def _reranker(folder: str | None, k: int | None, ds) -> str | None:
    """The folder --reranker names (None without it), checked with --rerank-k against the corpus; the model itself is
    loaded by the library once every output and option has been checked."""
    if folder is None:
        if k is not None:
            raise AdapterError("--rerank-k needs --reranker")
        return None
    from adapter.rerank import check_folder, check_k

    check_folder(folder)
    check_k(k if k is not None else DEFAULTS.rerank.k, len(ds.corpus))
    return folder


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@model_option
@click.option("--split", "split_name", default=None, help=f"Qrels split to score [default: {DEFAULTS.evaluate.split}].")
@click.option("--dims", callback=_dims, default=None, help="Comma-separated Matryoshka dims [default: the model's "
              "dimension and 512/256/128/64 below it].")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(dir_okay=False),
              help="Adapter file to score beside base (repeatable); each system is named after its file's stem.")
@click.option("--allow-other-model", is_flag=True, help="Apply adapters trained on another base model anyway.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write results JSON here.")
@click.option("--force", is_flag=True, help="Replace an existing --json file.")
@cache_option
@store_options
@click.option("--store-search", is_flag=True, help="Score through the store's own search (top 100 ids per query) "
              "instead of reading its vectors out: for indexes too large to read.")
@click.option("--store-search-sample", type=Number(int, 0), default=None, metavar="N", help="With --store-search: "
              f"check the store's top-10 against its exact search on N queries [default: "
              f"{DEFAULTS.store.search_sample}].")
@embedding_options
@rerank_options
def evaluate(directory: str, model: str | None, split_name: str | None, dims: tuple[int, ...] | None,
             adapters: tuple[str, ...], allow_other_model: bool, json_out: str | None, force: bool,
             cache_dir: str | None, source, id_field: str | None, embedding: dict, reranker_dir: str | None,
             rerank_k: int | None, store_search: bool, store_search_sample: int | None) -> None:
    """Score retrieval on DIRECTORY's split at each dim, base beside each adapter, and print the table.

    With a store (--index, --qdrant, --chroma, --pgvector) or --corpus-vectors the corpus vectors are read from
    there instead of embedded: only the queries are embedded."""
    from pathlib import Path

    from adapter.data import load_dataset
    from adapter.model import LinearAdapter, estimates_line
    from adapter.pipeline import evaluate_dataset, write_results
    from adapter.report import format_table

    _quiet_hf()
    cfg = Config().replace(model=model, split=split_name, dims=dims, cache_dir=cache_dir, id_field=id_field,
                           rerank_k=rerank_k, store_search_sample=store_search_sample, **embedding)
    if json_out:
        _check_output(json_out, force)
    ds = load_dataset(directory)
    reranker = _reranker(reranker_dir, rerank_k, ds)
    if store_search:
        from adapter.pipeline import evaluate_store_search

        if not source:
            raise AdapterError("--store-search needs the store: --index, --qdrant, --chroma or --pgvector")
        if reranker is not None:
            raise AdapterError("--store-search scores the store's own ranking; drop --reranker")
        with source.open(cfg) as store:
            s = evaluate_store_search(ds, store, cfg, adapters=adapters, allow_other_model=allow_other_model)
        results = s.results
        click.echo(f"scored through {s.store}'s own search: top {s.depth} ids per query, at its dimension {s.dim} "
                   "only; no vector read out")
        if s.sample:
            recalls = ", ".join(f"{name} {r:.4f}" for name, r in s.recall_at_10.items())
            click.echo(f"recall@10 of the store's search against exact search over its vectors, {s.sample} sampled "
                       f"queries: {recalls}")
    else:
        results = evaluate_dataset(ds, cfg, adapters=adapters, corpus=source.with_settings(cfg) if source else None,
                                   allow_other_model=allow_other_model, reranker=reranker)
    click.echo(format_table(results))
    for path in adapters:  # each adapter's own validation estimates, as `adapter train` printed them
        line = estimates_line(LinearAdapter.load(path).metadata)
        if line:
            click.echo(f"{Path(path).stem}: {line}")
    if json_out:
        write_results(results, json_out, force=force)
        click.echo(f"wrote {json_out}")


def _check_output(path: str, force: bool) -> None:
    """Refuse an existing output file (without --force) or a missing folder, before any model is loaded."""
    from pathlib import Path

    refuse_existing(path, force)
    if Path(path).is_dir():
        raise AdapterError(f"{path}: is a folder")
    if not Path(path).parent.is_dir():
        raise AdapterError(f"{Path(path).parent}: folder does not exist")


def _penalty(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return value
    try:
        number = float(value)
    except ValueError:
        raise click.BadParameter(f"expected a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise click.BadParameter(f"must be a finite number >= 0, got {value}")
    return number


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Adapter file to write (.safetensors).")
@model_option
@click.option("--split", "train_split", default=None,
              help=f"Qrels split to train on [default: {DEFAULTS.split.train_split}].")
@click.option("--loss", type=click.Choice(LOSSES), default=None,
              help=f"[default: {DEFAULTS.train.loss}]")
@click.option("--negatives", type=click.Choice(NEGATIVES), default=None,
              help="random: drawn from the whole corpus each step; hard: each question's top non-relevant chunks "
                   "under base, mined once by an exact search of the whole corpus (its cost grows with questions "
                   f"x chunks) [default: {DEFAULTS.train.negatives}]")
@click.option("--epochs", type=Number(int, 0), default=None, help=f"[default: {DEFAULTS.train.epochs}]")
@click.option("--lr", type=POSITIVE, default=None, help=f"[default: {DEFAULTS.train.lr}]")
@click.option("--batch-size", type=COUNT, default=None, help=f"[default: {DEFAULTS.train.batch_size}]")
@click.option("--margin", type=POSITIVE, default=None, help=f"Triplet margin [default: {DEFAULTS.train.margin}]")
@click.option("--temperature", type=POSITIVE, default=None,
              help=f"InfoNCE temperature [default: {DEFAULTS.train.temperature}]")
@click.option("--rank", type=COUNT, default=None, help="Low-rank residual form of this rank [default: full matrix].")
@click.option("--objective", default=None, help="What validation optimises: 'both' (seen-chunk gain, unseen chunks "
              "kept at base) or 'seen' (every chunk has questions) [default: both].")
@click.option("--recipe", default=None, help="'auto' (chosen by validation, the base competing), 'manual' (the "
              "options as given), or a recipe name: triplet, infonce, infonce-corpus, matryoshka, pull-0.01, "
              "pull-0.03, pull-0.1, pull-0.3, lowrank, uncovered-0.3, uncovered-1. A recipe asked for ships with its "
              "validation estimate printed, whatever it says "
              "[default: auto; manual when --loss, --negatives, --rank or --identity-penalty is given].")
@click.option("--identity-penalty", callback=_penalty, default=None,
              help=f"Pull toward the identity [default: {DEFAULTS.train.identity_penalty}].")
@click.option("--dtype", type=click.Choice(ADAPTER_DTYPES), default=None,
              help=f"Tensor dtype in the file [default: {DEFAULTS.train.dtype}]")
@click.option("--seed", type=SEED, default=None, help=f"[default: {DEFAULTS.seed}]")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write the recipe trials, coverage and validation estimates here as JSON.")
@cache_option
@store_options
@embedding_options
def train(directory: str, out: str, model: str | None, train_split: str | None, loss: str | None,
          negatives: str | None, epochs: int | None, lr: float | None, batch_size: int | None, margin: float | None,
          temperature: float | None, rank: int | None, identity_penalty: float | None, dtype: str | None,
          seed: int | None, force: bool, cache_dir: str | None, source, id_field: str | None, embedding: dict,
          objective: str | None, recipe: str | None, json_out: str | None) -> None:
    """Train a query-only adapter on DIRECTORY's cached embeddings and write it to --out.

    The recipe is chosen by cross-fitted validation: every training question is scored by fits that never saw it,
    once with its chunk trained on (seen) and once with its whole chunk held out (unseen); both estimates are
    printed and stored in the file, and when the base ships a line says why. With a store (--index, --qdrant, --chroma,
    --pgvector) or --corpus-vectors the corpus vectors are the ones the index already holds: only the queries are
    embedded."""
    from adapter.choice import resolve_train, train_adapter, train_summary
    from adapter.data import load_dataset

    cfg = Config().replace(model=model, train_split=train_split, loss=loss, negatives=negatives, epochs=epochs, lr=lr,
                           batch_size=batch_size, margin=margin, temperature=temperature, rank=rank,
                           identity_penalty=identity_penalty, dtype=dtype, seed=seed, cache_dir=cache_dir,
                           id_field=id_field, objective=objective, recipe=recipe, **embedding)
    cfg = resolve_train(cfg)
    _check_output(out, force)
    if json_out:  # every output checked before any work: none is written after the adapter and then refused
        _check_output(json_out, force)
        if os.path.abspath(json_out) == os.path.abspath(out):
            raise AdapterError(f"{json_out}: --json and --out name the same file")
    ds = load_dataset(directory)
    ds.split(cfg.split.train_split)
    result = train_adapter(ds, cfg, encoder=_encoder(cfg), corpus=source.with_settings(cfg) if source else None)
    path = result.adapter.save(out, dtype=cfg.train.dtype, force=force)
    for line in train_summary(result, cfg.train.objective):
        click.echo(line)
    click.echo(f"trained in {result.seconds:.1f} s; wrote {path} ({path.stat().st_size:,} bytes)")
    if json_out:
        import json

        from adapter.data import atomic_write

        try:
            with atomic_write(json_out) as f:
                json.dump({k: result.adapter.metadata[k] for k in ("recipe", "objective", "coverage", "estimates",
                                                                   "trials", "train_seconds")}, f, indent=2)
        except OSError as e:
            raise AdapterError(f"{json_out}: cannot write ({e.strerror or e}); the adapter is in {path}") from None
        click.echo(f"wrote {json_out}")


@main.command()
@click.argument("query")
@store_options
@click.option("--adapter", "adapter_path", required=True, type=click.Path(dir_okay=False), help="Adapter file.")
@model_option
@click.option("-k", "k", type=COUNT, default=None, help=f"How many results [default: {DEFAULTS.store.k}].")
@click.option("--nprobe", type=COUNT, default=None, help=f"FAISS IVF lists probed [default: {DEFAULTS.store.nprobe}].")
@click.option("--ef-search", type=COUNT, default=None, help=f"HNSW candidate list: FAISS, Qdrant server, Chroma, "
              f"pgvector [default: {DEFAULTS.store.ef_search}].")
@click.option("--json", "as_json", is_flag=True, help='Print {"ids": [...], "scores": [...]}.')
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Dataset folder whose corpus the store holds, to show texts.")
@click.option("--allow-other-model", is_flag=True, help="Apply an adapter trained on another base model anyway.")
@embedding_options
def search(query: str, source, id_field: str | None, adapter_path: str, model: str | None, k: int | None,
           nprobe: int | None, ef_search: int | None, as_json: bool, data_dir: str | None, allow_other_model: bool,
           embedding: dict) -> None:
    """Search an existing index (FAISS file, Qdrant, Chroma or pgvector, or a vector file) with QUERY through the
    adapter; only the query is embedded, and the store's own ids come back."""
    import json

    from adapter.data import load_dataset
    from adapter.pipeline import search as run
    from adapter.stores import hit_texts

    _quiet_hf()
    cfg = Config().replace(model=model, search_k=k, nprobe=nprobe, ef_search=ef_search, id_field=id_field,
                           **embedding)
    if not query.strip():
        raise AdapterError("the query is empty")
    ds = load_dataset(data_dir) if data_dir else None
    with source.open(cfg) as store:
        hits = run(query, store, adapter_path, cfg, allow_other_model=allow_other_model)[0]
        texts = hit_texts(store, ds, hits) if ds else [""] * len(hits.ids)
    if as_json:
        click.echo(json.dumps({"ids": hits.ids, "scores": hits.scores}))
        return
    for rank, (i, s, text) in enumerate(zip(hits.ids, hits.scores, texts, strict=True), 1):
        snippet = _printable(" ".join(text.split())[:100])
        click.echo(f"{rank:>3}. id {_printable(str(i))}  score {s:.4f}" + (f"  {snippet}" if text else ""))


BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _printable(text: str) -> str:
    """``text`` as a terminal may show it: control characters (ESC and every terminal sequence it starts, carriage
    returns, C1 controls) and bidirectional overrides are written as escapes (``\\x1b``), never sent as they are."""
    import unicodedata

    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) == "Cc"
                   or ch in BIDI_CONTROLS else ch for ch in text)


@main.group()
def index() -> None:
    """Build FAISS indexes from cached base vectors."""


@index.command("build")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="FAISS index file to write.")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
@model_option
@cache_option
@embedding_options
def index_build(directory: str, out: str, force: bool, model: str | None, cache_dir: str | None,
                embedding: dict) -> None:
    """Build an exact inner-product FAISS index of DIRECTORY's corpus; id i is the i-th line of corpus.jsonl."""
    from adapter.data import load_dataset
    from adapter.pipeline import embed_dataset
    from adapter.stores import write_index

    cfg = Config().replace(model=model, cache_dir=cache_dir, **embedding)
    _check_output(out, force)
    ds = load_dataset(directory)
    _, corpus = embed_dataset(ds, _encoder(cfg), query_ids=[])
    write_index(corpus, out, force=force)
    click.echo(f"wrote {out}: {len(corpus)} vectors of dimension {corpus.shape[1]}")


@main.command()
@click.argument("adapter_path", metavar="FILE.safetensors", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@model_option
@click.option("--allow-other-model", is_flag=True, help="Export an adapter trained on another base model anyway.")
@click.option("--force", is_flag=True, help="Replace an existing --out folder.")
@click.option("--push-to-hub", "repo_id", default=None, metavar="REPO",
              help="Then upload the folder to this Hugging Face Hub model repo (token: $HF_TOKEN or `hf auth login`).")
def export(adapter_path: str, out: str, model: str | None, allow_other_model: bool, force: bool,
           repo_id: str | None) -> None:
    """Write a sentence-transformers model folder whose encode_query applies the adapter in FILE.safetensors and
    whose encode_document is the untouched base model."""
    from adapter.export import export as run
    from adapter.hub import push_to_hub

    _quiet_hf()
    cfg = Config().replace(model=model)
    path = run(adapter_path, out, model=cfg.encoder.model, allow_other_model=allow_other_model, force=force)
    click.echo(f"wrote {path}: SentenceTransformer({str(path)!r}).encode_query applies the adapter")
    if repo_id:
        click.echo(f"pushed {path} to {push_to_hub(path, repo_id)}")


@main.command()
@click.argument("docs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Dataset folder to write corpus.jsonl in.")
@click.option("--size", type=int, default=None, help=f"Chunk size in --unit [default: {DEFAULTS.chunk.size}, or as "
              "many tokens as --model reads when that is less].")
@click.option("--overlap", type=int, default=None, help=f"Overlap between chunks [default: {DEFAULTS.chunk.overlap}, "
              "or half the size when the size follows the model].")
@click.option("--unit", type=click.Choice(CHUNK_UNITS), default=None,
              help=f"Count tokens of --model's tokenizer, or characters [default: {DEFAULTS.chunk.unit}].")
@model_option
@click.option("--force", is_flag=True, help="Replace a corpus already in --out.")
def chunk(docs: tuple[str, ...], out: str, size: int | None, overlap: int | None, unit: str | None,
          model: str | None, force: bool) -> None:
    """Split DOCS (.txt, .md, .pdf files or folders of them) into chunks in OUT/corpus.jsonl."""
    from adapter.chunking import chunk as run
    from adapter.chunking import model_max_tokens

    cfg = Config().replace(chunk_unit=unit, model=model)
    limit = model_max_tokens(cfg.encoder.model) if size is None and cfg.chunk.unit == "tokens" else None
    if limit is not None and limit < cfg.chunk.size:  # the default follows what the model reads
        size, overlap = limit, limit // 2 if overlap is None else overlap
    cfg = cfg.replace(chunk_size=size, chunk_overlap=overlap)
    chunks = run(docs, out, cfg, force=force)
    n_docs = len({c.source for c in chunks})
    click.echo(f"wrote {out}/corpus.jsonl: {len(chunks)} chunks from {n_docs} document{'s' * (n_docs != 1)} "
               f"({cfg.chunk.size} {cfg.chunk.unit}, overlap {cfg.chunk.overlap})")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--llm-model", default=None,
              help=f"Chat model that writes the questions [default: {DEFAULTS.llm.model}].")
@click.option("--base-url", default=None, help="Any OpenAI-compatible server, e.g. http://localhost:8000/v1 (vLLM) "
              "or http://localhost:11434/v1 (Ollama) [default: $OPENAI_BASE_URL, else OpenAI].")
@click.option("--api-key-env", default=None, help=f"Environment variable holding the API key [default: "
              f"{DEFAULTS.llm.api_key_env}].")
@click.option("--questions-per-chunk", type=int, default=None, help=f"[default: {DEFAULTS.llm.questions_per_chunk}]")
@click.option("--concurrency", type=int, default=None,
              help=f"Requests in flight [default: {DEFAULTS.llm.concurrency}].")
@click.option("--requests-per-minute", type=int, default=None, help=f"[default: {DEFAULTS.llm.requests_per_minute}]")
@click.option("--temperature", type=float, default=None, help=f"[default: {DEFAULTS.llm.temperature}]")
@click.option("--prompt", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Prompt template file with {chunk} and {n} in it [default: the built-in prompt].")
@click.option("--timeout", type=POSITIVE, default=None,
              help="Deadline in seconds for each whole request (connect, send, every read) "
                   f"[default: {DEFAULTS.llm.request_timeout}].")
@click.option("--max-retries", type=int, default=None, help=f"Re-asks per chunk [default: {DEFAULTS.llm.max_retries}].")
@click.option("--dedup-threshold", type=float, default=None, help="Cosine above which a question is dropped as a "
              f"near-duplicate [default: {DEFAULTS.llm.dedup_threshold}].")
@model_option
@cache_option
def generate(directory: str, llm_model: str | None, base_url: str | None, api_key_env: str | None,
             questions_per_chunk: int | None, concurrency: int | None, requests_per_minute: int | None,
             temperature: float | None, prompt: str | None, timeout: float | None, max_retries: int | None,
             dedup_threshold: float | None, model: str | None, cache_dir: str | None) -> None:
    """Ask an LLM for questions each chunk of DIRECTORY answers; writes queries.jsonl and qrels/all.tsv.

    Resumable: run the same command again after a crash or a kill and finished chunks are skipped.
    """
    from adapter.generate import generate as run

    cfg = Config().replace(llm_model=llm_model, base_url=base_url, api_key_env=api_key_env,
                           questions_per_chunk=questions_per_chunk, concurrency=concurrency,
                           requests_per_minute=requests_per_minute, llm_temperature=temperature, prompt=prompt,
                           request_timeout=timeout, max_retries=max_retries, dedup_threshold=dedup_threshold,
                           model=model, cache_dir=cache_dir)
    s = run(directory, cfg)
    reasons = ", ".join(f"{k}: {v}" for k, v in s.retry_reasons.items())
    click.echo(f"chunks: {s.chunks}, done {s.done} ({s.already_done} from an earlier run), failed {len(s.failed)}")
    click.echo(f"questions: {s.questions} written, {s.near_duplicates} near-duplicates dropped")
    click.echo(f"requests: {s.requests}, retries {s.retries}{f' ({reasons})' if reasons else ''}, {s.seconds:.1f} s")
    if s.failed:
        click.echo("failed chunks (run the same command again to retry them):")
        for cid, reason in s.failed.items():
            click.echo(f"  {cid}: {reason}")
        sys.exit(1)


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Model folder to write: new or empty, or holding the checkpoints of this same run (resumes).")
@model_option
@click.option("--dims", callback=_dims, default=None, help="Matryoshka dims to train, descending [default: the "
              "model's dimension and 512/256/128/64 below it].")
@click.option("--select-dim", type=COUNT, default=None, help="Dim whose validation ndcg@10 picks the kept epoch "
              "[default: 128 when trained, else the model's dimension].")
@click.option("--epochs", type=COUNT, default=None, help=f"[default: {DEFAULTS.finetune.epochs}]")
@click.option("--batch-size", type=Number(int, 2), default=None, help=f"Pairs per batch per process: the in-batch "
              f"negatives [default: {DEFAULTS.finetune.batch_size}].")
@click.option("--grad-accum", type=COUNT, default=None,
              help=f"Batches per optimizer step [default: {DEFAULTS.finetune.grad_accum}].")
@click.option("--lr", type=POSITIVE, default=None, help=f"[default: {DEFAULTS.finetune.lr}]")
@click.option("--max-seq-length", type=Number(int, 8), default=None, help="Truncate texts to N tokens while training "
              "[default: the model's own]; the saved model keeps the model's own length.")
@click.option("--split", "train_split", default=None,
              help=f"Qrels split to train on [default: {DEFAULTS.split.train_split}].")
@click.option("--seed", type=SEED, default=None, help=f"[default: {DEFAULTS.seed}]")
@click.option("--push-to-hub", "repo_id", default=None, metavar="REPO",
              help="Then upload the model folder to this Hugging Face Hub model repo (token: $HF_TOKEN).")
def finetune(directory: str, out: str, model: str | None, dims: tuple[int, ...] | None, select_dim: int | None,
             epochs: int | None, batch_size: int | None, grad_accum: int | None, lr: float | None,
             max_seq_length: int | None, train_split: str | None, seed: int | None, repo_id: str | None) -> None:
    """Fine-tune the whole encoder on DIRECTORY with MatryoshkaLoss(MultipleNegativesRankingLoss); write the best
    epoch to --out as a sentence-transformers model folder with a model card.

    Run the same command again after a crash to resume from the last finished epoch. Several processes or GPUs:
    `torchrun --nproc_per_node N -m cli finetune ...` or `accelerate launch --multi_gpu --num_processes N -m cli
    finetune ...` (on CPU too: gloo).
    """
    from adapter.cards import pct_change
    from adapter.data import load_dataset
    from adapter.finetune import finetune as run

    _quiet_hf()
    cfg = Config().replace(model=model, dims=dims, select_dim=select_dim, finetune_epochs=epochs,
                           finetune_batch_size=batch_size, grad_accum=grad_accum, finetune_lr=lr,
                           max_seq_length=max_seq_length, train_split=train_split, seed=seed)
    ds = load_dataset(directory)
    ds.split(cfg.split.train_split)
    r = run(ds, out, cfg)
    if not r.main_process:  # ranks > 0 of a multi-process run: rank 0 reports
        return
    b, f = r.base_val[r.select_dim]["ndcg@10"], r.best_val[r.select_dim]["ndcg@10"]
    change = pct_change(f, b, zero=NO_CHANGE)
    click.echo(f"validation ndcg@10 at dim {r.select_dim}: base {b:.4f} -> fine-tuned {f:.4f} ({change}); "
               f"epoch {r.best_epoch:g} kept")
    resumed = f", resumed from {r.resumed_from}" if r.resumed_from else ""
    click.echo(f"trained in {r.seconds:.1f} s on {r.world_size} process{'es' * (r.world_size > 1)}{resumed}; "
               f"wrote {r.path}")
    if repo_id:
        from adapter.hub import push_to_hub

        click.echo(f"pushed {r.path} to {push_to_hub(r.path, repo_id)}")


@main.command("rerank-train")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Reranker folder to write: new or empty, or holding the checkpoints of this same run (resumes).")
@click.option("--model", default=None, help="Start: a cross-encoder checkpoint, or any BERT-like encoder (gets a new "
              f"head, --head) [default: {DEFAULTS.rerank.model}'s backbone].")
@click.option("--head", type=click.Choice(["cosine", "classifier"]), default=None, help="The new head on an encoder: "
              "the cosine of its question and chunk token states (ranks from the start), or a one-logit classifier "
              f"on the pooler [default: {DEFAULTS.rerank.head}].")
@click.option("--encoder", default=None, help=f"First-stage bi-encoder that mines the hard negatives [default: "
              f"{DEFAULTS.encoder.model}].")
@click.option("--adapter", "adapter_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Mine the negatives under this adapter on the encoder (the first stage it will rerank).")
@click.option("--rerank-k", "k", type=int, default=None, help="First-stage candidates it learns to reorder "
              f"[default: {DEFAULTS.rerank.k}].")
@click.option("--loss", type=click.Choice(["lambda", "bce", "mnrl"]), default=None, help="lambda: LambdaLoss over "
              "each question's gold and hard-negative chunks; bce: BinaryCrossEntropyLoss on pairs; mnrl: "
              f"MultipleNegativesRankingLoss [default: {DEFAULTS.rerank.loss}].")
@click.option("--negatives", type=Number(int, 0), default=None, help="Hard negatives per question "
              f"[default: {DEFAULTS.rerank.negatives}].")
@click.option("--epochs", type=COUNT, default=None, help=f"[default: {DEFAULTS.rerank.epochs}]")
@click.option("--batch-size", type=COUNT, default=None, help=f"[default: {DEFAULTS.rerank.batch_size}]")
@click.option("--lr", type=POSITIVE, default=None, help=f"[default: {DEFAULTS.rerank.lr}]")
@click.option("--max-seq-length", type=Number(int, 8), default=None, help="Question + chunk tokens "
              f"[default: {DEFAULTS.rerank.max_seq_length}].")
@click.option("--max-train-seconds", type=POSITIVE, default=None, help="Stop training at this wall time; that point is "
              "validated like an epoch [default: no limit].")
@click.option("--val-queries", type=COUNT, default=None, help="Validation questions reranked each epoch "
              f"[default: {DEFAULTS.rerank.val_queries}].")
@click.option("--train-queries", type=COUNT, default=None, help="Train on a seeded sample of this many questions "
              "[default: all].")
@click.option("--bf16", type=click.Choice(["auto", "yes", "no"]), default=None, help="bfloat16 autocast for training "
              f"and reranking; auto: where the CPU or GPU does it natively [default: {DEFAULTS.rerank.bf16}].")
@click.option("--fusion/--no-fusion", default=None, help="Choose on validation a weight for the first stage's rank "
              "in the final order (0: the reranker alone) [default: fusion].")
@click.option("--prior-weight", "prior", type=Number(float, 0), default=None, help="lambda with fusion: the loss "
              "ranks by the score + this x the first stage's standardised score, so the model learns to correct the "
              f"first stage (0: to rank alone) [default: {DEFAULTS.rerank.prior:g}].")
@click.option("--base-share", type=Number(float, 0, 1), default=None, help="With --adapter: this share of the "
              "training questions bring base's lists instead, so the reranker learns to correct both first stages "
              f"[default: {DEFAULTS.rerank.base_share:g}].")
@click.option("--split", "train_split", default=None,
              help=f"Qrels split to train on [default: {DEFAULTS.split.train_split}].")
@click.option("--seed", type=SEED, default=None, help=f"[default: {DEFAULTS.seed}]")
@click.option("--push-to-hub", "repo_id", default=None, metavar="REPO",
              help="Then upload the reranker folder to this Hugging Face Hub model repo (token: $HF_TOKEN).")
@cache_option
def rerank_train(directory: str, out: str, model: str | None, head: str | None, encoder: str | None,
                 adapter_path: str | None, k: int | None, loss: str | None, negatives: int | None, epochs: int | None,
                 batch_size: int | None, lr: float | None, max_seq_length: int | None,
                 max_train_seconds: float | None, val_queries: int | None, train_queries: int | None,
                 bf16: str | None, fusion: bool | None, prior: float | None, base_share: float | None,
                 train_split: str | None, seed: int | None, repo_id: str | None, cache_dir: str | None) -> None:
    """Fine-tune a cross-encoder to rerank DIRECTORY's first-stage top-k (hard negatives mined once by the first
    stage); write the best epoch by validation ndcg@10 to --out with a model card.

    Run the same command again after a crash to resume from the last finished epoch."""
    from adapter.data import load_dataset
    from adapter.pipeline import rerank_train as run

    _quiet_hf()
    cfg = Config().replace(model=encoder, train_split=train_split, seed=seed, cache_dir=cache_dir, rerank_model=model,
                           rerank_k=k, rerank_loss=loss, rerank_negatives=negatives, rerank_epochs=epochs,
                           rerank_batch_size=batch_size, rerank_lr=lr, rerank_max_seq_length=max_seq_length,
                           max_train_seconds=max_train_seconds, val_queries=val_queries, train_queries=train_queries,
                           rerank_head=head, rerank_bf16=bf16, rerank_fusion=fusion, rerank_prior=prior,
                           base_share=base_share)
    ds = load_dataset(directory)
    ds.split(cfg.split.train_split)
    r = run(ds, out, cfg, adapter=adapter_path)
    f, b = r.best_val[r.dim]["ndcg@10"], r.base_val[r.dim]["ndcg@10"]
    fused = (f" (fused with the first stage's score at weight {r.fusion:g}; the reranker alone {r.alone:.4f})"
             if r.fusion else "")
    click.echo(f"validation ndcg@10: first stage {b:.4f} -> reranked top {cfg.rerank.k} {f:.4f} "
               f"({(f - b) / b:+.1%}){fused}; epoch {r.best_epoch:g} kept")
    resumed = f", resumed from {r.resumed_from}" if r.resumed_from else ""
    click.echo(f"trained in {r.seconds:.1f} s{resumed}; wrote {r.path}")
    if repo_id:
        from adapter.hub import push_to_hub

        click.echo(f"pushed {r.path} to {push_to_hub(r.path, repo_id)}")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder to write.")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(dir_okay=False),
              help="Adapter file (repeatable); the system is named after the file's stem.")
@click.option("--finetuned", multiple=True, type=click.Path(file_okay=False),
              help="Fine-tuned model folder (repeatable); the system is named after the folder.")
@click.option("--model", "models", multiple=True, help="Any other pre-trained model, by name or path (repeatable).")
@click.option("--base-model", default=None, help="The model the index was built with and the adapters trained on "
              f"[default: {DEFAULTS.encoder.model}].")
@click.option("--split", "split_name", default=None, help=f"Qrels split to score [default: {DEFAULTS.evaluate.split}].")
@click.option("--dims", callback=_dims, default=None, help="Comma-separated dims [default: each model's dimension "
              "and 512/256/128/64 below it].")
@click.option("--bootstrap", "bootstrap_samples", type=COUNT, default=None,
              help=f"Paired bootstrap resamples for the 95% intervals [default: {DEFAULTS.report.bootstrap_samples}].")
@click.option("--allow-other-model", is_flag=True, help="Apply adapters trained on another base model anyway.")
@click.option("--force", is_flag=True, help="Replace a report already in --out.")
@cache_option
@rerank_options
@click.option("--rag", "rag_json", type=click.Path(exists=True, dir_okay=False), default=None,
              help="rag.json from `adapter rag`: its answer accuracy joins the report.")
@store_options
@embedding_options
def compare(directory: str, out: str, adapters: tuple[str, ...], finetuned: tuple[str, ...], models: tuple[str, ...],
            base_model: str | None, split_name: str | None, dims: tuple[int, ...] | None,
            bootstrap_samples: int | None, allow_other_model: bool, force: bool, cache_dir: str | None,
            reranker_dir: str | None, rerank_k: int | None, rag_json: str | None, source, id_field: str | None,
            embedding: dict) -> None:
    """Score base, adapters, fine-tuned and other models side by side on DIRECTORY's split, with costs and paired
    bootstrap intervals; write report.md, results.json, summary.json and PNG plots to --out."""

    from adapter.data import load_dataset
    from adapter.pipeline import check_compare_out
    from adapter.pipeline import compare as run
    from adapter.report import cost_table, primary_table

    check_compare_out(out, force)  # before any model (a reranker's included) is loaded
    _quiet_hf()
    cfg = Config().replace(model=base_model, split=split_name, dims=dims, bootstrap_samples=bootstrap_samples,
                           cache_dir=cache_dir, rerank_k=rerank_k, id_field=id_field, **embedding)
    ds = load_dataset(directory)
    reranker = _reranker(reranker_dir, rerank_k, ds)
    c = run(ds, out, cfg, adapters=adapters, finetuned=finetuned, models=models, allow_other_model=allow_other_model,
            force=force, reranker=reranker, rag=rag_json, corpus=source.with_settings(cfg) if source else None)
    click.echo(primary_table(c))
    click.echo(cost_table(c, len(ds.corpus)))
    click.echo(f"wrote {', '.join(str(p) for p in c.files)}")


@main.command()
@click.option("--adapter", "adapter_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Adapter file; replacing it hot-reloads (an invalid replacement is refused, the old one serves on).")
@model_option
@click.option("--host", default=None, help="Address to listen on [default: 127.0.0.1].")
@click.option("--port", type=Number(int, 0, 65535), default=None, help="[default: 8080]")
@click.option("--api-key-env", default=None, metavar="NAME",
              help="Require 'Authorization: Bearer <value of $NAME>' on the embeddings and models endpoints.")
@click.option("--batch-window-ms", type=Number(float, 0), default=None,
              help="Longest a request waits to share a model call [default: 5].")
@click.option("--max-batch", type=COUNT, default=None, help="Texts per model call; 1 turns batching off [default: 64].")
@click.option("--max-body-bytes", type=COUNT, default=None, help="Larger request bodies get a 413 [default: 8 MiB].")
@click.option("--max-inputs", type=COUNT, default=None, help="Inputs per request [default: 2048].")
@click.option("--threads", type=COUNT, default=None, help="Torch threads for a local model [default: one per core].")
@click.option("--served-model-name", "served_model_names", multiple=True, metavar="NAME",
              help="A name requests may send as 'model' (repeatable), e.g. the one the app already sends; other "
                   "names get a 404 [default: the model's own name].")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let browser apps from ORIGIN call the server (repeatable; '*' for any) [default: none].")
@click.option("--header-timeout", type=Number(float, 0, low_open=True), default=None,
              help="Seconds a connection has to send a complete request head [default: 10].")
@click.option("--allow-other-model", is_flag=True, help="Serve an adapter trained on another base model anyway.")
@embedding_options
def serve(adapter_path: str, model: str | None, host: str | None, port: int | None, api_key_env: str | None,
          batch_window_ms: float | None, max_batch: int | None, max_body_bytes: int | None, max_inputs: int | None,
          threads: int | None, served_model_names: tuple[str, ...], cors_origins: tuple[str, ...],
          header_timeout: float | None, allow_other_model: bool, embedding: dict) -> None:
    """Serve OpenAI-compatible embeddings: base_url http://HOST:PORT/v1 gets adapted query vectors,
    http://HOST:PORT/documents/v1 the untouched base vectors the index holds (or, on either, a request's input_type:
    query or document).

    With --model openai:NAME --embedding-base-url UPSTREAM each request is forwarded to that server (with retries)
    and the adapter applied to its answer."""
    from adapter.serve import serve as run

    if embedding["processes"] or embedding["devices"]:
        raise AdapterError("--processes and --devices are for bulk embedding; serve batches live requests in one "
                           "process (use --threads)")
    _quiet_hf()
    cfg = Config().replace(model=model, host=host, port=port, serve_auth_key_env=api_key_env,
                           batch_window_ms=batch_window_ms, max_batch=max_batch, max_body_bytes=max_body_bytes,
                           max_inputs=max_inputs, threads=threads, served_model_names=served_model_names or None,
                           cors_origins=cors_origins or None, header_timeout=header_timeout, **embedding)
    run(adapter_path, cfg, allow_other_model=allow_other_model)

@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--llm-model", default=None, help=f"Chat model that answers [default: {DEFAULTS.llm.model}].")
@click.option("--judge-model", default=None, help="Chat model that grades the answers [default: --llm-model].")
@click.option("--base-url", default=None, help="Any OpenAI-compatible server [default: $OPENAI_BASE_URL, else OpenAI].")
@click.option("--api-key-env", default=None, help=f"Environment variable holding the API key [default: "
              f"{DEFAULTS.llm.api_key_env}].")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for answers.jsonl, rag.json and the journal [default: DIRECTORY/rag].")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(dir_okay=False), help="Adapter file "
              "(repeatable).")
@click.option("--finetuned", multiple=True, type=click.Path(file_okay=False), help="Fine-tuned model folder "
              "(repeatable).")
@rerank_options
@click.option("--systems", "names", default=None, help="Comma-separated systems to ask about [default: all; base is "
              "always kept].")
@click.option("-k", "k", type=int, default=None, help=f"Chunks in each answer prompt [default: {DEFAULTS.rag.k}].")
@click.option("--limit", type=int, default=None, help="Ask a seeded sample of N test questions [default: all].")
@click.option("--split", "split_name", default=None, help=f"Qrels split whose questions are asked [default: "
              f"{DEFAULTS.evaluate.split}].")
@click.option("--concurrency", type=int, default=None,
              help=f"Requests in flight [default: {DEFAULTS.llm.concurrency}].")
@click.option("--requests-per-minute", type=int, default=None, help=f"[default: {DEFAULTS.llm.requests_per_minute}]")
@click.option("--timeout", type=POSITIVE, default=None,
              help="Deadline in seconds for each whole request (connect, send, every read) "
                   f"[default: {DEFAULTS.llm.request_timeout}].")
@click.option("--max-retries", type=int, default=None,
              help=f"Re-asks per request [default: {DEFAULTS.llm.max_retries}].")
@click.option("--seed", type=SEED, default=None, help=f"[default: {DEFAULTS.seed}]")
@model_option
@cache_option
def rag(directory: str, llm_model: str | None, judge_model: str | None, base_url: str | None,
        api_key_env: str | None, out: str | None, adapters: tuple[str, ...], finetuned: tuple[str, ...],
        reranker_dir: str | None, rerank_k: int | None, names: str | None, k: int | None, limit: int | None,
        split_name: str | None, concurrency: int | None, requests_per_minute: int | None, timeout: float | None,
        max_retries: int | None, seed: int | None, model: str | None, cache_dir: str | None) -> None:
    """Answer DIRECTORY's test questions from each system's top-k chunks with an LLM, grade each answer against the
    gold chunk with a judge LLM, and report answer accuracy beside retrieval, with paired bootstrap intervals.

    Resumable: run the same command again after a crash or a kill; journalled replies are not asked again."""
    from pathlib import Path

    from adapter.data import load_dataset
    from adapter.rag import RESULTS, run_rag, sample_questions
    from adapter.report import rag_table
    from adapter.systems import build_systems

    cfg = Config().replace(llm_model=llm_model, base_url=base_url, api_key_env=api_key_env, split=split_name,
                           concurrency=concurrency, requests_per_minute=requests_per_minute, request_timeout=timeout,
                           max_retries=max_retries, seed=seed, model=model, cache_dir=cache_dir, rag_k=k, limit=limit,
                           judge_model=judge_model, rerank_k=rerank_k)
    ds = load_dataset(directory)
    qrels = ds.split(cfg.evaluate.split)
    if cfg.rag.limit is not None and cfg.rag.limit < 1:
        raise AdapterError(f"--limit must be at least 1, got {cfg.rag.limit}")
    if cfg.rag.k < 1 or cfg.rag.k > len(ds.corpus):
        raise AdapterError(f"-k {cfg.rag.k} is outside 1..{len(ds.corpus)} (the corpus's chunk count)")
    reranker = _reranker(reranker_dir, rerank_k, ds)
    from adapter.resilience import make_client

    make_client(cfg.llm.base_url, cfg.llm.api_key_env, cfg.llm.request_timeout)  # no key: stop before loading models
    qids = sample_questions(qrels, cfg.rag.limit, cfg.seed)
    _quiet_hf()
    systems = build_systems(cfg, adapters=adapters, finetuned=finetuned, reranker=reranker)
    if names:
        keep = [n.strip() for n in names.split(",") if n.strip()]
        unknown = next((n for n in keep if n not in systems), None)
        if unknown:
            raise AdapterError(f"--systems: no system named {unknown!r} (there are {', '.join(systems)})")
        systems = {n: s for n, s in systems.items() if n == "base" or n in keep}
    r = run_rag(ds, systems, qids, out or Path(directory) / "rag", cfg)
    import json

    click.echo(rag_table(json.loads((Path(out or Path(directory) / "rag") / RESULTS).read_text())))
    reasons = ", ".join(f"{a}: {b}" for a, b in r.retry_reasons.items())
    click.echo(f"questions: {r.questions}, compared on {r.compared} graded for every system; ungraded: "
               + ", ".join(f"{s} {n}" for s, n in r.ungraded.items()))
    click.echo(f"requests: {r.requests}, retries {r.retries}{f' ({reasons})' if reasons else ''}, "
               f"{r.reused} replies reused from an earlier run, {r.seconds:.1f} s")
    click.echo(f"wrote {', '.join(str(p) for p in r.files)}")
    if r.failed:
        click.echo(f"{r.failed} question(s) failed every retry: run the same command again to ask them again")
        sys.exit(1)


if __name__ == "__main__":
    main()
