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
    for noisy in ("sentence_transformers", "transformers", "httpx", "faiss", "huggingface_hub"):
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
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write results JSON here.")
@cache_option
def evaluate(directory: str, model: str | None, split_name: str | None, dims: tuple[int, ...] | None,
             json_out: str | None, cache_dir: str | None) -> None:
    """Score retrieval on DIRECTORY's split at each dim and print a side-by-side table."""
    from adapter.data import load_dataset
    from adapter.pipeline import evaluate_dataset, write_results
    from adapter.report import format_table

    cfg = Config().replace(model=model, split=split_name, dims=dims, cache_dir=cache_dir)
    ds = load_dataset(directory)
    ds.split(cfg.split)  # fail on a missing split before loading a model
    results = evaluate_dataset(ds, _encoder(cfg), split=cfg.split, dims=cfg.dims)
    click.echo(format_table(results))
    if json_out:
        write_results(results, json_out)
        click.echo(f"wrote {json_out}")


if __name__ == "__main__":
    main()
