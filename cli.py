"""The `adapter` command line: parse options, call one library function, print. No logic lives here."""

from __future__ import annotations

import logging
import math
import os
import sys

import click

from adapter.config import ADAPTER_DTYPES, CHUNK_UNITS, DEMO_OUT, FORMS, SPLIT_BY, Config, SettingError
from adapter.data import FORMATS
from adapter.errors import AdapterError, RedactingFilter, redact, refuse_existing, strip_credentials

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


class Keyed(click.Option):
    """An option that sets one config key (``train.rank``): the key its value goes to, and the name the CLI's error
    messages use for that key (``_Group`` below turns a library message's ``train.rank`` into ``--rank``)."""

    def __init__(self, *args, key: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.key = key


def keyed(key: str, *decls: str, **kwargs):
    """``click.option`` for the config key ``key`` (``section.field``, or ``seed``)."""
    return click.option(*decls, cls=kwargs.pop("cls", Keyed), key=key, **kwargs)


def _flags(command: click.Command | None) -> dict[str, str]:
    """Config key -> the flag that sets it on ``command``."""
    params = command.params if command else []
    return {p.key: p.opts[0] for p in params if isinstance(p, Keyed)}


def _speak_flags(message: str, flags: dict[str, str]) -> str:
    """A library message with each config key a flag of this command sets written as that flag (``train.recipe`` ->
    ``--recipe``); keys without a flag stay as they are: they are what ``--set`` takes."""
    import re

    for key, flag in sorted(flags.items(), key=lambda kv: -len(kv[0])):
        message = re.sub(rf"(?<![\w.]){re.escape(key)}(?![\w.])", flag, message)
    return message


class _Group(click.Group):
    """Turns AdapterError into one line on stderr and exit code 1, never a traceback; config keys the command has a
    flag for are named by that flag."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AdapterError as e:
            sub = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            click.echo(f"Error: {redact(_speak_flags(str(e), _flags(sub)))}", err=True)
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


model_option = keyed("encoder.model", "--model", default=None, help="Sentence-transformers model name or path, or "
                     "openai:NAME for any OpenAI-compatible /v1/embeddings (see --embedding-base-url) "
                     f"[default: {DEFAULTS.encoder.model}].")
cache_option = keyed("encoder.cache_dir", "--cache-dir", default=None, help="Embedding cache folder [default: "
                     "$ADAPTER_CACHE, else $XDG_CACHE_HOME/adapter, else ~/.cache/adapter].")
embedding_option = keyed(
    "embedding.base_url", "--embedding-base-url", default=None, metavar="URL", help="OpenAI-compatible server for "
    "--model openai:NAME, e.g. http://localhost:8080/v1 (TEI, vLLM, Ollama, LiteLLM) [default: $OPENAI_BASE_URL, "
    "else OpenAI]; its other settings (embedding.api_key_env, .dimensions, .query_prefix, .concurrency ...) and "
    "local worker processes (encoder.processes, encoder.devices) go through --set.")
SEED_OPTION = keyed("seed", "--seed", type=SEED, default=None, help=f"[default: {DEFAULTS.seed}]")


def _settings(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> Config:
    try:
        return Config().with_settings(value)
    except SettingError as e:
        raise click.BadParameter(str(e)) from None


def settings_option(*sections: str):
    """The repeatable ``--set section.field=value``: any config field, parsed by its type in adapter/config.py. The
    command gets a ``settings`` Config, onto which its own flags are laid."""
    example = {"train": "train.epochs=5", "llm": "llm.temperature=0.7", "rerank": "rerank.lr=5e-5",
               "serve": "serve.max_batch=32", "finetune": "finetune.lr=1e-5", "split": "split.test_fraction=0.3",
               "evaluate": "rerank.k=50", "rag": "rag.k=3", "report": "report.bootstrap_samples=2000",
               "store": "store.nprobe=128"}.get(sections[0], "encoder.batch_size=32")
    return click.option("--set", "settings", multiple=True, callback=_settings, metavar="KEY=VALUE",
                        help=f"Any other setting, repeatable, e.g. --set {example}: {', '.join(sections)} ... "
                        "(every field of adapter/config.py, with its default and reason there).")


def with_flags(cfg: Config) -> Config:
    """``cfg`` (the command's --set settings) with each keyed flag the user gave laid on top."""
    ctx = click.get_current_context()
    return cfg.replace(**{p.key: ctx.params[p.name] for p in ctx.command.params
                          if isinstance(p, Keyed) and ctx.params.get(p.name) not in (None, ())})


STORE_KINDS = {  # --store KIND:WHERE -> the form WHERE takes; split at the last "/" (or ","), so DSNs and URLs parse
    "faiss": "faiss:FILE", "qdrant": "qdrant:PATH_OR_URL/COLLECTION", "chroma": "chroma:PATH_OR_URL/COLLECTION",
    "pgvector": "pgvector:DSN/TABLE", "vectors": "vectors:FILE.parquet or vectors:VECTORS.npy,IDS.txt"}


class StoreSpec(click.ParamType):
    """``--store KIND:WHERE``: one existing index or vector file, as an ``adapter.stores.StoreSource``. The last
    "/" separates a collection or table from the location before it, so a URL's or DSN's own slashes stay."""

    name = "store"

    def convert(self, value, param, ctx):
        from adapter.corpus import StoreSource

        if not isinstance(value, str):
            return value
        kind, _, where = value.partition(":")
        shown = strip_credentials(value)
        if kind not in STORE_KINDS:
            self.fail(f"expected KIND:WHERE, KIND one of {', '.join(STORE_KINDS)}, got {shown!r}", param, ctx)
        if kind == "faiss":
            if not where:
                self.fail(f"expected {STORE_KINDS[kind]}, got {shown!r}", param, ctx)
            return StoreSource(index=where)
        if kind == "vectors":
            if where.endswith(".parquet"):
                return StoreSource(vectors=where)
            vectors, _, ids = where.rpartition(",")
            if not vectors.endswith(".npy") or not ids:
                self.fail(f"expected {STORE_KINDS[kind]}, got {shown!r}", param, ctx)
            return StoreSource(vectors=vectors, ids=ids)
        location, _, name = where.rpartition("/")
        if not location or not name or location.endswith(":/"):
            self.fail(f"expected {STORE_KINDS[kind]}, got {shown!r}", param, ctx)
        if kind == "pgvector":
            if "://" in location and "/" not in location.partition("://")[2]:  # a URL DSN names its database
                self.fail(f"expected {STORE_KINDS[kind]} (the table after the database), got {shown!r}", param, ctx)
            return StoreSource(pgvector=location, table=name)
        return StoreSource(**{kind: location, "collection": name})


def store_option(f=None, *, required: bool = False, help: str = "Read the corpus vectors from an existing index "
                 "instead of embedding the corpus: only the queries are embedded."):
    """``--store KIND:WHERE`` (``StoreSpec``); handed over as ``source`` (None without it)."""
    forms = "; ".join(STORE_KINDS.values())
    option = click.option("--store", "source", type=StoreSpec(), default=None, required=required,
                          metavar="KIND:WHERE", help=f"{help} One of {forms} (Qdrant key in $QDRANT_API_KEY, pgvector "
                          "password in $PGPASSWORD or the DSN; a FAISS index without ids: row i = line i of "
                          "corpus.jsonl). Store settings: --set store.id_field=FIELD, store.nprobe, store.ef_search.")
    return option if f is None else option(f)


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
    r = run_demo(out, with_flags(Config()), with_finetune=with_finetune)
    click.echo(format_table(r.comparison.results, metrics=("ndcg@10", "accuracy@1", "accuracy@10")))
    click.echo(f"adapter: {r.adapter} ({r.adapter.stat().st_size / 1024:.0f} KiB); apply it to query vectors only")
    from adapter.model import estimates_line, read_metadata

    click.echo(f"adapter: {estimates_line(read_metadata(r.adapter))}")
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
@keyed("split.by", "--by", type=click.Choice(SPLIT_BY), default=None,
       help=f"Hold out random queries or whole chunks [default: {DEFAULTS.split.by}].")
@SEED_OPTION
@click.option("--force", is_flag=True, help="Replace a split already in DIRECTORY.")
@settings_option("split")
def split(directory: str, by: str | None, seed: int | None, force: bool, settings: Config) -> None:
    """Split DIRECTORY's qrels/all.tsv into train/test (and dev) qrels (fractions: --set split.test_fraction=0.3,
    split.dev_fraction=0.1)."""
    from adapter.data import split_dataset

    cfg = with_flags(settings)
    s = split_dataset(directory, cfg, force=force)
    counts = ", ".join(f"{n} {name}" for name, n in s["queries"].items() if n)
    n_dropped = s["dropped_queries"]
    dropped = f"; {n_dropped} queries dropped (relevant chunks on both sides)" if n_dropped else ""
    click.echo(f"split {directory} by {cfg.split.by} (seed {cfg.seed}): {counts} queries{dropped}")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@model_option
@cache_option
@embedding_option
@settings_option("encoder", "embedding")
def embed(directory: str, model: str | None, cache_dir: str | None, embedding_base_url: str | None,
          settings: Config) -> None:
    """Embed every query and chunk of DIRECTORY into the on-disk cache (only texts not cached yet)."""
    from adapter.data import load_dataset
    from adapter.pipeline import embed_dataset

    cfg = with_flags(settings)
    ds = load_dataset(directory)
    enc = _encoder(cfg)
    embed_dataset(ds, enc)
    total = len(ds.queries) + len(ds.corpus)
    click.echo(f"{enc.identity}: {enc.texts_encoded} texts embedded, {total - enc.texts_encoded} already cached")


reranker_option = click.option(
    "--reranker", "reranker_dir", type=click.Path(file_okay=False), default=None, help="Cross-encoder folder (from "
    "`adapter rerank-train`): each system is also scored with its top rerank.k "
    f"(--set rerank.k=N, default {DEFAULTS.rerank.k}) reordered, as '<system>+rerank'.")


def _reranker(folder: str | None, cfg: Config, ds) -> str | None:
    """The folder --reranker names (None without it), checked with rerank.k against the corpus; the model itself is
    loaded by the library once every output and option has been checked."""
    if folder is None:
        return None
    from adapter.rerank import check_folder, check_k

    check_folder(folder)
    check_k(cfg.rerank.k, len(ds.corpus))
    return folder


split_name_option = keyed("evaluate.split", "--split", "split_name", default=None,
                          help=f"Qrels split to score [default: {DEFAULTS.evaluate.split}].")


def _dims_option(help: str):
    return keyed("evaluate.dims", "--dims", callback=_dims, default=None, help=help)


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@model_option
@split_name_option
@_dims_option("Comma-separated Matryoshka dims [default: the model's dimension and 512/256/128/64 below it].")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(dir_okay=False),
              help="Adapter file to score beside base (repeatable); each system is named after its file's stem.")
@click.option("--allow-other-model", is_flag=True, help="Apply adapters trained on another base model anyway.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write results JSON here.")
@click.option("--force", is_flag=True, help="Replace an existing --json file.")
@cache_option
@store_option
@click.option("--store-search", is_flag=True, help="Score through the store's own search (top 100 ids per query) "
              "instead of reading its vectors out: for indexes too large to read (check against exact search on "
              f"store.search_sample queries, default {DEFAULTS.store.search_sample}).")
@embedding_option
@reranker_option
@settings_option("evaluate", "store", "rerank", "embedding")
def evaluate(directory: str, model: str | None, split_name: str | None, dims: tuple[int, ...] | None,
             adapters: tuple[str, ...], allow_other_model: bool, json_out: str | None, force: bool,
             cache_dir: str | None, source, embedding_base_url: str | None, reranker_dir: str | None,
             store_search: bool, settings: Config) -> None:
    """Score retrieval on DIRECTORY's split at each dim, base beside each adapter, and print the table.

    With --store the corpus vectors are read from that index instead of embedded: only the queries are embedded."""
    from pathlib import Path

    from adapter.data import load_dataset
    from adapter.model import estimates_line, read_metadata
    from adapter.pipeline import evaluate_dataset, write_results
    from adapter.report import format_table

    _quiet_hf()
    cfg = with_flags(settings)
    if json_out:
        _check_output(json_out, force)
    ds = load_dataset(directory)
    reranker = _reranker(reranker_dir, cfg, ds)
    if store_search:
        from adapter.pipeline import evaluate_store_search

        if not source:
            raise AdapterError("--store-search needs --store")
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
        line = estimates_line(read_metadata(path))
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


class LazyChoice(click.Choice):
    """A choice among values the training module lists, read from it when first needed (so that the CLI starts
    without importing torch)."""

    def __init__(self, values) -> None:
        super().__init__([])
        self._values = values

    @property
    def choices(self):
        return self._values()

    @choices.setter
    def choices(self, value) -> None:
        pass


def _recipe_choices() -> tuple[str, ...]:
    from adapter.choice import LORA, RECIPES

    return ("auto", "manual", *RECIPES, LORA)


def _objectives() -> tuple[str, ...]:
    from adapter.choice import OBJECTIVES

    return OBJECTIVES


class RecipeOption(Keyed):
    """--recipe, whose help lists the recipes ``auto`` tries, from the same list the training loop reads."""

    def get_help_record(self, ctx: click.Context):
        from adapter.choice import AUTO_RECIPES, RECIPES

        others = [name for name in RECIPES if name not in AUTO_RECIPES]
        self.help = (f"'auto' chooses by validation among {', '.join(AUTO_RECIPES)}, the base competing; 'manual' "
                     f"trains the settings as given; or one recipe by name (those, or {', '.join(others)}; 'lora' "
                     "with --form lora), shipped with its estimate printed [default: auto; manual when --rank or "
                     "--set train.loss, "
                     "train.negatives or train.identity_penalty is given].")
        return super().get_help_record(ctx)


@main.command(epilog="Every other training setting goes through --set, e.g. --set train.epochs=5 --set train.lr=1e-3 "
              "--set split.train_split=dev (train.loss, .negatives, .margin, .temperature, .batch_size, "
              ".identity_penalty ...: adapter/config.py lists each with its default and reason).")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Adapter file to write (.safetensors).")
@model_option
@embedding_option
@store_option
@keyed("train.form", "--form", type=click.Choice(FORMS), default=None, help="'linear': a map on query vectors "
       "(seconds on a CPU, numpy to apply); 'lora': LoRA on the encoder's query route, trained against the corpus "
       "vectors as they stand (minutes; documents stay the base's); 'auto': both compete in the one choice "
       f"[default: {DEFAULTS.train.form}].")
@keyed("train.recipe", "--recipe", cls=RecipeOption, type=LazyChoice(_recipe_choices), default=None, metavar="NAME")
@keyed("train.objective", "--objective", type=LazyChoice(_objectives), default=None, help="What validation "
       "optimises: 'both' (seen-chunk gain, unseen chunks kept at base) or 'seen' (every chunk has questions) "
       f"[default: {DEFAULTS.train.objective}].")
@keyed("train.rank", "--rank", type=COUNT, default=None, help="Low-rank residual form of this rank "
       "[default: full matrix].")
@keyed("train.dtype", "--dtype", type=click.Choice(ADAPTER_DTYPES), default=None,
       help=f"Tensor dtype in the file [default: {DEFAULTS.train.dtype}]")
@SEED_OPTION
@settings_option("train", "split", "encoder", "embedding", "store")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write the recipe trials, coverage and validation estimates here as JSON.")
@cache_option
def train(directory: str, out: str, model: str | None, embedding_base_url: str | None, source, form: str | None,
          recipe: str | None, objective: str | None, rank: int | None, dtype: str | None, seed: int | None,
          settings: Config, force: bool, json_out: str | None, cache_dir: str | None) -> None:
    """Train a query-only adapter on DIRECTORY's cached embeddings and write it to --out.

    --form lora trains LoRA layers on the encoder's query route instead of a map on query vectors: the index is
    still untouched, since every chunk is a candidate through its cached (or stored) vector. The recipe is chosen
    by cross-fitted validation: every training question is scored by fits that never saw it, once with its chunk
    trained on (seen) and once with its whole chunk held out (unseen); both estimates are printed and stored in the
    file, and when the base ships a line says why. With --store the corpus vectors are the ones the index already
    holds: only the queries are embedded."""
    from adapter.choice import resolve_train, train_adapter, train_summary
    from adapter.data import load_dataset

    cfg = resolve_train(with_flags(settings))
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
        click.echo(_speak_flags(line, _flags(click.get_current_context().command)))
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
@store_option(required=True, help="The index to search.")
@click.option("--adapter", "adapter_path", required=True, type=click.Path(dir_okay=False),
              help="Adapter file of either form, linear or query LoRA (a LoRA needs a local --model).")
@model_option
@keyed("store.k", "-k", type=COUNT, default=None, help=f"How many results [default: {DEFAULTS.store.k}].")
@click.option("--json", "as_json", is_flag=True, help='Print {"ids": [...], "scores": [...]}.')
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Dataset folder whose corpus the store holds, to show texts.")
@click.option("--allow-other-model", is_flag=True, help="Apply an adapter trained on another base model anyway.")
@embedding_option
@settings_option("store", "embedding")
def search(query: str, source, adapter_path: str, model: str | None, k: int | None, as_json: bool,
           data_dir: str | None, allow_other_model: bool, embedding_base_url: str | None, settings: Config) -> None:
    """Search an existing index (FAISS file, Qdrant, Chroma or pgvector, or a vector file) with QUERY through the
    adapter (either form); only the query is embedded, and the store's own ids come back (IVF lists probed and HNSW
    candidates: --set store.nprobe=N, --set store.ef_search=N)."""
    import json

    from adapter.data import load_dataset
    from adapter.pipeline import search as run
    from adapter.stores import hit_texts

    _quiet_hf()
    cfg = with_flags(settings)
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
@embedding_option
@settings_option("encoder", "embedding")
def index_build(directory: str, out: str, force: bool, model: str | None, cache_dir: str | None,
                embedding_base_url: str | None, settings: Config) -> None:
    """Build an exact inner-product FAISS index of DIRECTORY's corpus; id i is the i-th line of corpus.jsonl."""
    from adapter.data import load_dataset
    from adapter.pipeline import embed_dataset
    from adapter.stores import write_index

    cfg = with_flags(settings)
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
    """Write a sentence-transformers model folder whose encode_query applies the adapter in FILE.safetensors (either
    form: a linear adapter as a Dense layer after the base, a query LoRA as the base with the LoRA merged) and whose
    encode_document is the untouched base model."""
    from adapter.export import export as run
    from adapter.hub import push_to_hub

    _quiet_hf()
    cfg = with_flags(Config())
    path = run(adapter_path, out, model=cfg.encoder.model, allow_other_model=allow_other_model, force=force)
    click.echo(f"wrote {path}: SentenceTransformer({str(path)!r}).encode_query applies the adapter")
    if repo_id:
        click.echo(f"pushed {path} to {push_to_hub(path, repo_id)}")


@main.command()
@click.argument("docs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Dataset folder to write corpus.jsonl in.")
@keyed("chunk.size", "--size", type=int, default=None, help=f"Chunk size in --unit [default: {DEFAULTS.chunk.size}, "
       "or as many tokens as --model reads when that is less].")
@keyed("chunk.overlap", "--overlap", type=int, default=None, help="Overlap between chunks [default: "
       f"{DEFAULTS.chunk.overlap}, or half the size when the size follows the model].")
@keyed("chunk.unit", "--unit", type=click.Choice(CHUNK_UNITS), default=None,
       help=f"Count tokens of --model's tokenizer, or characters [default: {DEFAULTS.chunk.unit}].")
@model_option
@click.option("--force", is_flag=True, help="Replace a corpus already in --out.")
def chunk(docs: tuple[str, ...], out: str, size: int | None, overlap: int | None, unit: str | None,
          model: str | None, force: bool) -> None:
    """Split DOCS (.txt, .md, .pdf files or folders of them) into chunks in OUT/corpus.jsonl."""
    from adapter.chunking import chunk as run
    from adapter.chunking import model_max_tokens

    cfg = with_flags(Config())
    limit = model_max_tokens(cfg.encoder.model) if size is None and cfg.chunk.unit == "tokens" else None
    if limit is not None and limit < cfg.chunk.size:  # the default follows what the model reads
        cfg = cfg.replace(size=limit, overlap=limit // 2 if overlap is None else overlap)
    chunks = run(docs, out, cfg, force=force)
    n_docs = len({c.source for c in chunks})
    click.echo(f"wrote {out}/corpus.jsonl: {len(chunks)} chunks from {n_docs} document{'s' * (n_docs != 1)} "
               f"({cfg.chunk.size} {cfg.chunk.unit}, overlap {cfg.chunk.overlap})")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@keyed("llm.model", "--llm-model", default=None,
       help=f"Chat model that writes the questions [default: {DEFAULTS.llm.model}].")
@keyed("llm.base_url", "--base-url", default=None, help="Any OpenAI-compatible server, e.g. http://localhost:8000/v1 "
       "(vLLM) or http://localhost:11434/v1 (Ollama) [default: $OPENAI_BASE_URL, else OpenAI].")
@keyed("llm.questions_per_chunk", "--questions-per-chunk", type=int, default=None,
       help=f"[default: {DEFAULTS.llm.questions_per_chunk}]")
@keyed("llm.prompt", "--prompt", type=click.Path(exists=True, dir_okay=False), default=None,
       help="Prompt template file with {chunk} and {n} in it [default: the built-in prompt].")
@model_option
@cache_option
@settings_option("llm")
def generate(directory: str, llm_model: str | None, base_url: str | None, questions_per_chunk: int | None,
             prompt: str | None, model: str | None, cache_dir: str | None, settings: Config) -> None:
    """Ask an LLM for questions each chunk of DIRECTORY answers; writes queries.jsonl and qrels/all.tsv. The key is
    read from $OPENAI_API_KEY (another variable: --set llm.api_key_env=VAR); requests in flight, rate, timeout,
    retries, temperature and the near-duplicate cosine are llm.concurrency, .requests_per_minute, .request_timeout,
    .max_retries, .temperature and .dedup_threshold.

    Resumable: run the same command again after a crash or a kill and finished chunks are skipped.
    """
    from adapter.generate import generate as run

    cfg = with_flags(settings)
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
@_dims_option("Matryoshka dims to train, descending [default: the model's dimension and 512/256/128/64 below it].")
@keyed("finetune.epochs", "--epochs", type=COUNT, default=None, help=f"[default: {DEFAULTS.finetune.epochs}]")
@SEED_OPTION
@click.option("--push-to-hub", "repo_id", default=None, metavar="REPO",
              help="Then upload the model folder to this Hugging Face Hub model repo (token: $HF_TOKEN).")
@settings_option("finetune", "split")
def finetune(directory: str, out: str, model: str | None, dims: tuple[int, ...] | None, epochs: int | None,
             seed: int | None, repo_id: str | None, settings: Config) -> None:
    """Fine-tune the whole encoder on DIRECTORY with MatryoshkaLoss(MultipleNegativesRankingLoss); write the best
    epoch to --out as a sentence-transformers model folder with a model card. Batch size (the in-batch negatives),
    gradient accumulation, learning rate, training length in tokens and the dim that picks the kept epoch:
    --set finetune.batch_size=N, .grad_accum, .lr, .max_seq_length, .select_dim; the split: split.train_split.

    Run the same command again after a crash to resume from the last finished epoch. Several processes or GPUs:
    `torchrun --nproc_per_node N -m cli finetune ...` or `accelerate launch --multi_gpu --num_processes N -m cli
    finetune ...` (on CPU too: gloo).
    """
    from adapter.cards import pct_change
    from adapter.data import load_dataset
    from adapter.finetune import finetune as run

    _quiet_hf()
    cfg = with_flags(settings)
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
@keyed("rerank.model", "--model", default=None, help="Start: a cross-encoder checkpoint, or any BERT-like encoder "
       f"(gets a new head, rerank.head) [default: {DEFAULTS.rerank.model}'s backbone].")
@keyed("encoder.model", "--encoder", default=None, help="First-stage bi-encoder that mines the hard negatives "
       f"[default: {DEFAULTS.encoder.model}].")
@click.option("--adapter", "adapter_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Mine the negatives under this adapter on the encoder (the first stage it will rerank).")
@keyed("rerank.epochs", "--epochs", type=COUNT, default=None, help=f"[default: {DEFAULTS.rerank.epochs}]")
@SEED_OPTION
@click.option("--push-to-hub", "repo_id", default=None, metavar="REPO",
              help="Then upload the reranker folder to this Hugging Face Hub model repo (token: $HF_TOKEN).")
@cache_option
@settings_option("rerank", "split")
def rerank_train(directory: str, out: str, model: str | None, encoder: str | None, adapter_path: str | None,
                 epochs: int | None, seed: int | None, repo_id: str | None, cache_dir: str | None,
                 settings: Config) -> None:
    """Fine-tune a cross-encoder to rerank DIRECTORY's first-stage top-k (hard negatives mined once by the first
    stage); write the best epoch by validation ndcg@10 to --out with a model card. The head, k, loss, negatives,
    batch size, learning rate, sequence length, time limit, question samples, bf16, fusion, prior and base share
    are rerank.head, .k, .loss, .negatives, .batch_size, .lr, .max_seq_length, .max_train_seconds, .val_queries,
    .train_queries, .bf16, .fusion, .prior, .base_share: --set rerank.k=50.

    Run the same command again after a crash to resume from the last finished epoch."""
    from adapter.data import load_dataset
    from adapter.pipeline import rerank_train as run

    _quiet_hf()
    cfg = with_flags(settings)
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
@keyed("encoder.model", "--base-model", default=None, help="The model the index was built with and the adapters "
       f"trained on [default: {DEFAULTS.encoder.model}].")
@split_name_option
@_dims_option("Comma-separated dims [default: each model's dimension and 512/256/128/64 below it].")
@click.option("--allow-other-model", is_flag=True, help="Apply adapters trained on another base model anyway.")
@click.option("--force", is_flag=True, help="Replace a report already in --out.")
@cache_option
@reranker_option
@click.option("--rag", "rag_json", type=click.Path(exists=True, dir_okay=False), default=None,
              help="rag.json from `adapter rag`: its answer accuracy joins the report.")
@store_option
@embedding_option
@settings_option("report", "evaluate", "rerank", "store", "embedding")
def compare(directory: str, out: str, adapters: tuple[str, ...], finetuned: tuple[str, ...], models: tuple[str, ...],
            base_model: str | None, split_name: str | None, dims: tuple[int, ...] | None, allow_other_model: bool,
            force: bool, cache_dir: str | None, reranker_dir: str | None, rag_json: str | None, source,
            embedding_base_url: str | None, settings: Config) -> None:
    """Score base, adapters, fine-tuned and other models side by side on DIRECTORY's split, with costs and paired
    bootstrap intervals (report.bootstrap_samples resamples: --set report.bootstrap_samples=2000); write report.md,
    results.json, summary.json and PNG plots to --out."""

    from adapter.data import load_dataset
    from adapter.pipeline import check_compare_out
    from adapter.pipeline import compare as run
    from adapter.report import cost_table, primary_table

    check_compare_out(out, force)  # before any model (a reranker's included) is loaded
    _quiet_hf()
    cfg = with_flags(settings)
    ds = load_dataset(directory)
    reranker = _reranker(reranker_dir, cfg, ds)
    c = run(ds, out, cfg, adapters=adapters, finetuned=finetuned, models=models, allow_other_model=allow_other_model,
            force=force, reranker=reranker, rag=rag_json, corpus=source.with_settings(cfg) if source else None)
    click.echo(primary_table(c))
    click.echo(cost_table(c, len(ds.corpus)))
    click.echo(f"wrote {', '.join(str(p) for p in c.files)}")


@main.command()
@click.option("--adapter", "adapter_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Adapter file of either form, linear or query LoRA (a LoRA needs a local --model); replacing it "
              "hot-reloads, to either form (an invalid replacement is refused, the old one serves on).")
@model_option
@keyed("serve.host", "--host", default=None, help=f"Address to listen on [default: {DEFAULTS.serve.host}].")
@keyed("serve.port", "--port", type=Number(int, 0, 65535), default=None, help=f"[default: {DEFAULTS.serve.port}]")
@keyed("serve.auth_key_env", "--api-key-env", default=None, metavar="NAME",
       help="Require 'Authorization: Bearer <value of $NAME>' on the embeddings and models endpoints.")
@keyed("serve.threads", "--threads", type=COUNT, default=None, help="Torch threads for a local model "
       "[default: one per core].")
@keyed("serve.served_model_names", "--served-model-name", "served_model_names", multiple=True, metavar="NAME",
       help="A name requests may send as 'model' (repeatable), e.g. the one the app already sends; other names get a "
       "404 [default: the model's own name].")
@keyed("serve.cors_origins", "--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
       help="Let browser apps from ORIGIN call the server (repeatable; '*' for any) [default: none].")
@click.option("--allow-other-model", is_flag=True, help="Serve an adapter trained on another base model anyway.")
@embedding_option
@settings_option("serve", "embedding")
def serve(adapter_path: str, model: str | None, host: str | None, port: int | None, api_key_env: str | None,
          threads: int | None, served_model_names: tuple[str, ...], cors_origins: tuple[str, ...],
          allow_other_model: bool, embedding_base_url: str | None, settings: Config) -> None:
    """Serve OpenAI-compatible embeddings: base_url http://HOST:PORT/v1 gets adapted query vectors,
    http://HOST:PORT/documents/v1 the untouched base vectors the index holds (or, on either, a request's input_type:
    query or document). Batching and limits: --set serve.batch_window_ms=5, serve.max_batch, .max_body_bytes,
    .max_inputs, .header_timeout.

    With a query LoRA (form 'lora') the queries run through the base with the LoRA merged, a second local model;
    documents stay the base's. With --model openai:NAME --embedding-base-url UPSTREAM each request is forwarded to
    that server (with retries) and a linear adapter applied to its answer (a LoRA is refused: it needs the model's
    weights)."""
    from adapter.serve import serve as run

    cfg = with_flags(settings)
    if cfg.encoder.processes or cfg.encoder.devices:
        raise AdapterError("encoder.processes and encoder.devices are for bulk embedding; serve batches live requests "
                           "in one process (use --threads)")
    _quiet_hf()
    run(adapter_path, cfg, allow_other_model=allow_other_model)

@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@keyed("llm.model", "--llm-model", default=None, help=f"Chat model that answers [default: {DEFAULTS.llm.model}].")
@keyed("rag.judge_model", "--judge-model", default=None, help="Chat model that grades the answers "
       "[default: --llm-model].")
@keyed("llm.base_url", "--base-url", default=None, help="Any OpenAI-compatible server [default: $OPENAI_BASE_URL, "
       "else OpenAI].")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for answers.jsonl, rag.json and the journal [default: DIRECTORY/rag].")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(dir_okay=False), help="Adapter file "
              "(repeatable).")
@click.option("--finetuned", multiple=True, type=click.Path(file_okay=False), help="Fine-tuned model folder "
              "(repeatable).")
@reranker_option
@click.option("--systems", "names", default=None, help="Comma-separated systems to ask about [default: all; base is "
              "always kept].")
@keyed("rag.limit", "--limit", type=int, default=None, help="Ask a seeded sample of N test questions [default: all].")
@split_name_option
@SEED_OPTION
@model_option
@cache_option
@settings_option("rag", "llm")
def rag(directory: str, llm_model: str | None, judge_model: str | None, base_url: str | None, out: str | None,
        adapters: tuple[str, ...], finetuned: tuple[str, ...], reranker_dir: str | None, names: str | None,
        limit: int | None, split_name: str | None, seed: int | None, model: str | None, cache_dir: str | None,
        settings: Config) -> None:
    """Answer DIRECTORY's test questions from each system's top-k chunks with an LLM, grade each answer against the
    gold chunk with a judge LLM, and report answer accuracy beside retrieval, with paired bootstrap intervals. Chunks
    per prompt: --set rag.k=5; the key's variable, requests in flight, rate, timeout and retries: llm.api_key_env,
    .concurrency, .requests_per_minute, .request_timeout, .max_retries.

    Resumable: run the same command again after a crash or a kill; journalled replies are not asked again."""
    from pathlib import Path

    from adapter.data import load_dataset
    from adapter.rag import RESULTS, run_rag, sample_questions
    from adapter.report import rag_table
    from adapter.systems import build_systems

    cfg = with_flags(settings)
    ds = load_dataset(directory)
    qrels = ds.split(cfg.evaluate.split)
    if cfg.rag.limit is not None and cfg.rag.limit < 1:
        raise AdapterError(f"rag.limit must be at least 1, got {cfg.rag.limit}")
    if cfg.rag.k < 1 or cfg.rag.k > len(ds.corpus):
        raise AdapterError(f"rag.k {cfg.rag.k} is outside 1..{len(ds.corpus)} (the corpus's chunk count)")
    reranker = _reranker(reranker_dir, cfg, ds)
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
