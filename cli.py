"""The `adapter` command line: parse options, call one library function, print. No logic lives here."""

from __future__ import annotations

import logging
import sys

import click

from adapter.config import AdapterError, Config
from adapter.data import FORMATS

logger = logging.getLogger("adapter")


def _dims(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 384,256,128,64, got {value!r}") from None


class _Group(click.Group):
    """Turns AdapterError into one line on stderr and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AdapterError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
@click.option("-q", "--quiet", is_flag=True, help="Log warnings only.")
def main(verbose: bool, quiet: bool) -> None:
    """Make retrieval better on your own data without rebuilding your vector index."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    for noisy in ("sentence_transformers", "transformers", "httpx", "httpx2", "openai", "faiss", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


model_option = click.option("--model", default=None, help="Sentence-transformers model name or path "
                            f"[default: {Config.model}].")
cache_option = click.option("--cache-dir", default=None, help="Embedding cache folder [default: $ADAPTER_CACHE or "
                            "~/.cache/adapter].")


def _encoder(cfg: Config):
    from transformers.utils import logging as hf_logging

    from adapter.encoder import Encoder

    hf_logging.disable_progress_bar()  # the weight-loading bar is noise on every command
    return Encoder(cfg.model, cache_dir=cfg.cache_dir, batch_size=cfg.encode_batch_size)


@main.command()
@click.argument("src", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Dataset folder to write.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="Source format [default: detect].")
@click.option("--force", is_flag=True, help="Replace a dataset already in --out.")
def convert(src: str, out: str, fmt: str | None, force: bool) -> None:
    """Convert SRC (chunks JSON, LlamaIndex JSON, pairs CSV/JSONL or a BEIR folder) into a dataset folder."""
    from adapter.data import convert as run

    detected = fmt is None
    ds, fmt = run(src, out, fmt=fmt, force=force)
    n_pairs = sum(len(r) for r in ds.qrels["all"].values())
    click.echo(f"{'detected' if detected else 'format'}: {fmt}")
    click.echo(f"wrote {out}: {len(ds.corpus)} chunks, {len(ds.queries)} queries, {n_pairs} qrels")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--by", type=click.Choice(["query", "chunk"]), default=None,
              help=f"Hold out random queries or whole chunks [default: {Config.split_by}].")
@click.option("--test-fraction", type=float, default=None, help=f"[default: {Config.test_fraction}]")
@click.option("--dev-fraction", type=float, default=None, help=f"[default: {Config.dev_fraction}]")
@click.option("--seed", type=int, default=None, help=f"[default: {Config.seed}]")
def split(directory: str, by: str | None, test_fraction: float | None, dev_fraction: float | None,
          seed: int | None) -> None:
    """Split DIRECTORY's qrels/all.tsv into train/test (and dev) qrels."""
    from adapter.data import split_dataset

    cfg = Config().replace(split_by=by, test_fraction=test_fraction, dev_fraction=dev_fraction, seed=seed)
    s = split_dataset(directory, by=cfg.split_by, test_fraction=cfg.test_fraction, dev_fraction=cfg.dev_fraction,
                      seed=cfg.seed)
    counts = ", ".join(f"{n} {name}" for name, n in s["queries"].items() if n)
    n_dropped = s["dropped_queries"]
    dropped = f"; {n_dropped} queries dropped (relevant chunks on both sides)" if n_dropped else ""
    click.echo(f"split {directory} by {cfg.split_by} (seed {cfg.seed}): {counts} queries{dropped}")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@model_option
@cache_option
def embed(directory: str, model: str | None, cache_dir: str | None) -> None:
    """Embed every query and chunk of DIRECTORY into the on-disk cache (only texts not cached yet)."""
    from adapter.data import load_dataset
    from adapter.pipeline import embed_dataset

    cfg = Config().replace(model=model, cache_dir=cache_dir)
    ds = load_dataset(directory)
    enc = _encoder(cfg)
    embed_dataset(ds, enc)
    total = len(ds.queries) + len(ds.corpus)
    click.echo(f"{enc.identity}: {enc.texts_encoded} texts embedded, {total - enc.texts_encoded} already cached")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@model_option
@click.option("--split", "split_name", default=None, help=f"Qrels split to score [default: {Config.split}].")
@click.option("--dims", callback=_dims, default=None, help="Comma-separated Matryoshka dims [default: the model's "
              "dimension and 512/256/128/64 below it].")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(dir_okay=False),
              help="Adapter file to score beside base (repeatable); each system is named after its file's stem.")
@click.option("--allow-other-model", is_flag=True, help="Apply adapters trained on another base model anyway.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write results JSON here.")
@cache_option
def evaluate(directory: str, model: str | None, split_name: str | None, dims: tuple[int, ...] | None,
             adapters: tuple[str, ...], allow_other_model: bool, json_out: str | None, cache_dir: str | None) -> None:
    """Score retrieval on DIRECTORY's split at each dim, base beside each adapter, and print the table."""
    from adapter.data import load_dataset
    from adapter.pipeline import evaluate_dataset, load_adapters, write_results
    from adapter.report import format_table

    cfg = Config().replace(model=model, split=split_name, dims=dims, cache_dir=cache_dir)
    ds = load_dataset(directory)
    ds.split(cfg.split)  # fail on a missing split before loading a model
    encoder = _encoder(cfg)
    systems = load_adapters(adapters, encoder, allow_other_model=allow_other_model)
    results = evaluate_dataset(ds, encoder, split=cfg.split, dims=cfg.dims, adapters=systems)
    click.echo(format_table(results))
    if json_out:
        write_results(results, json_out)
        click.echo(f"wrote {json_out}")


def _penalty(ctx: click.Context, param: click.Parameter, value: str | None) -> float | str | None:
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"expected a number or 'auto', got {value!r}") from None


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Adapter file to write (.safetensors).")
@model_option
@click.option("--split", "train_split", default=None, help=f"Qrels split to train on [default: {Config.train_split}].")
@click.option("--loss", type=click.Choice(["triplet", "infonce"]), default=None, help=f"[default: {Config.loss}]")
@click.option("--negatives", type=click.Choice(["random", "hard"]), default=None,
              help=f"[default: {Config.negatives}]")
@click.option("--epochs", type=int, default=None, help=f"[default: {Config.epochs}]")
@click.option("--lr", type=float, default=None, help=f"[default: {Config.lr}]")
@click.option("--batch-size", type=int, default=None, help=f"[default: {Config.batch_size}]")
@click.option("--margin", type=float, default=None, help=f"Triplet margin [default: {Config.margin}]")
@click.option("--temperature", type=float, default=None, help=f"InfoNCE temperature [default: {Config.temperature}]")
@click.option("--rank", type=int, default=None, help="Low-rank residual form of this rank [default: full matrix].")
@click.option("--identity-penalty", callback=_penalty, default=None,
              help=f"Pull toward the identity, or 'auto' to choose it on held-out chunks "
                   f"[default: {Config.identity_penalty}].")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default=None,
              help=f"Tensor dtype in the file [default: {Config.dtype}]")
@click.option("--seed", type=int, default=None, help=f"[default: {Config.seed}]")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
@cache_option
def train(directory: str, out: str, model: str | None, train_split: str | None, loss: str | None,
          negatives: str | None, epochs: int | None, lr: float | None, batch_size: int | None, margin: float | None,
          temperature: float | None, rank: int | None, identity_penalty: float | str | None, dtype: str | None,
          seed: int | None, force: bool, cache_dir: str | None) -> None:
    """Train a query-only adapter on DIRECTORY's cached embeddings and write it to --out."""
    from pathlib import Path

    from adapter.data import load_dataset
    from adapter.train import train_adapter

    cfg = Config().replace(model=model, train_split=train_split, loss=loss, negatives=negatives, epochs=epochs, lr=lr,
                           batch_size=batch_size, margin=margin, temperature=temperature, rank=rank,
                           identity_penalty=identity_penalty, dtype=dtype, seed=seed, cache_dir=cache_dir)
    if Path(out).exists() and not force:
        raise AdapterError(f"{out}: already exists; pass --force to replace it")
    if not Path(out).parent.is_dir():
        raise AdapterError(f"{Path(out).parent}: folder does not exist")
    ds = load_dataset(directory)
    ds.split(cfg.train_split)
    result = train_adapter(ds, _encoder(cfg), cfg)
    path = result.adapter.save(out, dtype=cfg.dtype)
    base, best = result.base_val["ndcg@10"], result.best_val["ndcg@10"]
    won = f"epoch {result.best_epoch} won" if result.best_epoch else "epoch 0 (the identity) won: no epoch beat base"
    click.echo(f"validation ndcg@10: base {base:.4f} -> adapter {best:.4f} ({(best - base) / base:+.1%}); {won}")
    click.echo(f"trained {cfg.epochs} epochs in {result.seconds:.1f} s; wrote {path} ({path.stat().st_size:,} bytes)")


@main.command()
@click.argument("query")
@click.option("--index", "index_path", required=True, type=click.Path(dir_okay=False),
              help="FAISS index built from base corpus vectors.")
@click.option("--adapter", "adapter_path", required=True, type=click.Path(dir_okay=False), help="Adapter file.")
@model_option
@click.option("-k", "k", type=int, default=10, show_default=True, help="How many results.")
@click.option("--json", "as_json", is_flag=True, help='Print {"ids": [...], "scores": [...]}.')
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Dataset folder whose corpus the index holds, to show texts.")
@click.option("--allow-other-model", is_flag=True, help="Apply an adapter trained on another base model anyway.")
def search(query: str, index_path: str, adapter_path: str, model: str | None, k: int, as_json: bool,
           data_dir: str | None, allow_other_model: bool) -> None:
    """Search an existing FAISS index with QUERY through the adapter; only the query is embedded."""
    import json

    from transformers.utils import logging as hf_logging

    from adapter.index import AdaptedEncoder, read_index, search_index

    hf_logging.disable_progress_bar()
    cfg = Config().replace(model=model)
    index = read_index(index_path)
    encoder = AdaptedEncoder(adapter_path, cfg.model, allow_other_model=allow_other_model)
    scores, ids = search_index(index, encoder.encode_query([query]), k)
    hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
    if as_json:
        click.echo(json.dumps({"ids": [i for i, _ in hits], "scores": [s for _, s in hits]}))
        return
    texts = _corpus_by_index_id(data_dir) if data_dir else {}
    for rank, (i, s) in enumerate(hits, 1):
        text = texts.get(i, "")
        click.echo(f"{rank:>3}. id {i}  score {s:.4f}" + (f"  {text[:100]}" if text else ""))


def _corpus_by_index_id(data_dir: str) -> dict[int, str]:
    from adapter.data import load_dataset

    ds = load_dataset(data_dir)
    return {i: ds.corpus[c] for i, c in enumerate(ds.corpus)}


@main.group()
def index() -> None:
    """Build FAISS indexes from cached base vectors."""


@index.command("build")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="FAISS index file to write.")
@model_option
@cache_option
def index_build(directory: str, out: str, model: str | None, cache_dir: str | None) -> None:
    """Build an exact inner-product FAISS index of DIRECTORY's corpus; id i is the i-th line of corpus.jsonl."""
    from adapter.data import load_dataset
    from adapter.index import write_index
    from adapter.pipeline import embed_dataset

    cfg = Config().replace(model=model, cache_dir=cache_dir)
    ds = load_dataset(directory)
    _, corpus = embed_dataset(ds, _encoder(cfg), query_ids=[])
    write_index(corpus, out)
    click.echo(f"wrote {out}: {len(corpus)} vectors of dimension {corpus.shape[1]}")


@main.command()
@click.argument("docs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Dataset folder to write corpus.jsonl in.")
@click.option("--size", type=int, default=None, help=f"Chunk size in --unit [default: {Config.chunk_size}].")
@click.option("--overlap", type=int, default=None, help=f"Overlap between chunks [default: {Config.chunk_overlap}].")
@click.option("--unit", type=click.Choice(["tokens", "chars"]), default=None,
              help=f"Count tokens of --model's tokenizer, or characters [default: {Config.chunk_unit}].")
@model_option
@click.option("--force", is_flag=True, help="Replace a corpus already in --out.")
def chunk(docs: tuple[str, ...], out: str, size: int | None, overlap: int | None, unit: str | None,
          model: str | None, force: bool) -> None:
    """Split DOCS (.txt, .md, .pdf files or folders of them) into chunks in OUT/corpus.jsonl."""
    from adapter.chunking import chunk as run

    cfg = Config().replace(chunk_size=size, chunk_overlap=overlap, chunk_unit=unit, model=model)
    chunks = run(docs, out, cfg, force=force)
    n_docs = len({c.source for c in chunks})
    click.echo(f"wrote {out}/corpus.jsonl: {len(chunks)} chunks from {n_docs} document{'s' * (n_docs != 1)} "
               f"({cfg.chunk_size} {cfg.chunk_unit}, overlap {cfg.chunk_overlap})")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--llm-model", default=None, help=f"Chat model that writes the questions [default: {Config.llm_model}].")
@click.option("--base-url", default=None, help="Any OpenAI-compatible server, e.g. http://localhost:8000/v1 (vLLM) "
              "or http://localhost:11434/v1 (Ollama) [default: $OPENAI_BASE_URL, else OpenAI].")
@click.option("--api-key-env", default=None, help=f"Environment variable holding the API key [default: "
              f"{Config.api_key_env}].")
@click.option("--questions-per-chunk", type=int, default=None, help=f"[default: {Config.questions_per_chunk}]")
@click.option("--concurrency", type=int, default=None, help=f"Requests in flight [default: {Config.concurrency}].")
@click.option("--requests-per-minute", type=int, default=None, help=f"[default: {Config.requests_per_minute}]")
@click.option("--temperature", type=float, default=None, help=f"[default: {Config.llm_temperature}]")
@click.option("--prompt", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Prompt template file with {chunk} and {n} in it [default: the built-in prompt].")
@click.option("--timeout", type=float, default=None, help=f"Seconds per request [default: {Config.request_timeout}].")
@click.option("--max-retries", type=int, default=None, help=f"Re-asks per chunk [default: {Config.max_retries}].")
@click.option("--dedup-threshold", type=float, default=None, help="Cosine above which a question is dropped as a "
              f"near-duplicate [default: {Config.dedup_threshold}].")
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


if __name__ == "__main__":
    main()
