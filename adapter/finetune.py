"""The full Matryoshka fine-tune: every weight of the encoder, through the sentence-transformers trainer.

Stock parts only: ``MatryoshkaLoss`` around ``MultipleNegativesRankingLoss`` over (question, chunk) pairs,
``BatchSamplers.NO_DUPLICATES`` so no chunk is its own in-batch negative, warmup then cosine decay, fused AdamW where
torch has it, bf16 and tf32 on GPUs that support them. After every epoch the project's own judge scores the validation
queries at every dim (wrapped as a sentence-transformers evaluator) and the best epoch by ndcg@10 at one dim is kept.

It runs unchanged under ``torchrun --nproc_per_node N`` and ``accelerate launch --multi_gpu --num_processes N`` (GPUs,
or CPU processes over gloo): the trainer wraps the model in DDP, in-batch negatives are gathered across ranks, rank 0
writes. Checkpoints live in ``OUT/checkpoints`` until the model
is installed in ``OUT``, so running the same command again after a crash resumes from the last complete one.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sentence_transformers.base.evaluation import BaseEvaluator

from adapter.backends import has_router, load_model, role_prompt
from adapter.cards import model_card as card
from adapter.cards import pct_change
from adapter.config import REFERENCE_DIM, Config, EncoderConfig
from adapter.data import Dataset, Qrels, atomic_write, fingerprint, relevant, train_val_qrels
from adapter.errors import AdapterError
from adapter.evaluate import METRICS, PRIMARY_METRIC, Results, evaluate, resolve_dims
from adapter.model import FINETUNE_FILE, FINETUNE_VERSION
from adapter.st_trainer import (
    CHECKPOINTS,
    CLOCK_FILE,
    clock_callback,
    epoch_selection_args,
    install,
    prepare_out,
    quiet_progress_callback,
    read_json,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

BASE_FILE = "base.json"  # in CHECKPOINTS: the base model's validation metrics, measured once


@dataclass
class FinetuneResult:
    """Where the model went and how the kept epoch scored on validation (every dim)."""

    path: Path
    best_epoch: float
    select_dim: int
    base_val: Results  # the base model's validation metrics by dim
    best_val: Results  # the kept epoch's validation metrics by dim
    seconds: float  # training wall time, resumed runs included (the base model's evaluation excluded)
    world_size: int
    resumed_from: str | None
    main_process: bool  # False on the ranks > 0 of a multi-process run, which write nothing


class RetrievalEvaluator(BaseEvaluator):
    """The project's judge as a sentence-transformers evaluator: the model being trained embeds the validation
    queries and the whole corpus (no cache: its weights change every epoch), ``evaluate`` scores every dim.

    Returns ``{"dim_{d}_{metric}": value}``; the primary metric is ndcg@10 at ``primary_dim``.
    """

    def __init__(self, dataset: Dataset, qrels: Qrels, dims: Sequence[int], primary_dim: int,
                 batch_size: int = EncoderConfig.batch_size):
        super().__init__()
        self.qrels = relevant(qrels)
        self.query_ids = list(self.qrels)
        self.corpus_ids = list(dataset.corpus)
        self.queries = [dataset.queries[q] for q in self.query_ids]
        self.documents = [dataset.doc_text(c) for c in self.corpus_ids]
        self.dims = list(dims)
        self.batch_size = batch_size
        self.primary_metric = f"dim_{primary_dim}_{PRIMARY_METRIC}"

    def __call__(self, model: SentenceTransformer, output_path: str | None = None, epoch: float = -1,
                 steps: int = -1) -> dict[str, float]:
        kw = {"batch_size": self.batch_size, "normalize_embeddings": True, "convert_to_numpy": True,
              "show_progress_bar": False}
        queries = model.encode_query(self.queries, **kw)  # (n_queries, d)
        corpus = model.encode_document(self.documents, **kw)  # (n_chunks, d)
        results = evaluate(queries, corpus, self.qrels, self.query_ids, self.corpus_ids, self.dims)
        logger.info("validation %s at epoch %g: %s", PRIMARY_METRIC, max(epoch, 0),
                    ", ".join(f"dim {d} {r[PRIMARY_METRIC]:.4f}" for d, r in results.items()))
        return {f"dim_{d}_{m}": v for d, r in results.items() for m, v in r.items()}


def matryoshka_dims(dims: Sequence[int] | None, full_dim: int) -> list[int]:
    """The dims to train: strictly descending, none above the model's dimension, the full dimension first (added
    when missing); default the full dimension and each standard one below it."""
    if any(a <= b for a, b in zip(dims or [], (dims or [])[1:], strict=False)):
        raise AdapterError(f"evaluate.dims {','.join(map(str, dims))}: dimensions must be strictly descending, like "
                           "384,256,128,64")
    dims = resolve_dims(dims, full_dim)  # positive and within the model, as every command checks them
    if dims[0] != full_dim:
        logger.info("training the model's full dimension %d as well", full_dim)
        dims.insert(0, full_dim)
    return dims


def select_dim(requested: int | None, dims: Sequence[int]) -> int:
    """The dim whose ndcg@10 picks the kept epoch: as requested, else 128 when trained, else the full dim."""
    if requested is None:
        return REFERENCE_DIM if REFERENCE_DIM in dims else dims[0]
    if requested not in dims:
        raise AdapterError(f"finetune.select_dim {requested} is not one of the trained dims {','.join(map(str, dims))}")
    return requested


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _by_dim(metrics: dict[str, float], dims: Sequence[int], prefix: str = "eval_") -> Results:
    """``{"eval_dim_128_ndcg@10": v, ...}`` -> ``{128: {"ndcg@10": v, ...}}``."""
    return {d: {m: float(metrics[f"{prefix}dim_{d}_{m}"]) for m in METRICS} for d in dims}


def _training_args(cfg: Config, out: Path, select: int, model: SentenceTransformer, progress: bool):
    import torch
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    cuda = torch.cuda.is_available()
    cpu_ranks = not cuda and _world_size() > 1  # several CPU processes: accelerate wants to be told, and gloo
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters
    prompts = {"anchor": role_prompt(model, "query"), "positive": role_prompt(model, "document")}
    router = has_router(model)
    return SentenceTransformerTrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        num_train_epochs=cfg.finetune.epochs,
        per_device_train_batch_size=cfg.finetune.batch_size,
        gradient_accumulation_steps=cfg.finetune.grad_accum,
        learning_rate=cfg.finetune.lr,
        warmup_steps=cfg.finetune.warmup,  # a float below 1 is a share of the steps
        lr_scheduler_type="cosine",
        optim="adamw_torch_fused" if fused else "adamw_torch",
        bf16=cuda and torch.cuda.is_bf16_supported(),
        tf32=True if cuda and torch.cuda.get_device_capability()[0] >= 8 else None,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        use_cpu=cpu_ranks,
        ddp_backend="gloo" if cpu_ranks else None,
        dataloader_pin_memory=cuda,
        dataloader_drop_last=_world_size() > 1,  # gathering across ranks needs equal batches on every rank
        **epoch_selection_args(f"eval_dim_{select}_{PRIMARY_METRIC}", progress, cfg.seed),
        prompts={k: v for k, v in prompts.items() if v} or None,
        router_mapping={"anchor": "query", "positive": "document"} if router else None,
    )


def finetune(dataset: Dataset, out: str | os.PathLike, cfg: Config | None = None, *,
             progress: bool = True) -> FinetuneResult:
    """Fine-tune ``cfg.encoder.model`` on a dataset split with MatryoshkaLoss(MultipleNegativesRankingLoss) and
    install the best epoch as a sentence-transformers model folder in ``out``, with a model card and
    ``finetune.json``."""
    try:
        import accelerate  # noqa: F401  (the trainer's own requirement, checked here for a one-line message)
        from datasets import Dataset as HFDataset
    except ImportError as e:
        raise AdapterError(f"fine-tuning needs the {e.name!r} package: pip install 'adapter[train]'") from None
    from sentence_transformers import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    cfg = cfg or Config()
    out = Path(out)
    if cfg.finetune.epochs < 1 or cfg.finetune.batch_size < 2 or cfg.finetune.grad_accum < 1 or cfg.finetune.lr <= 0:
        raise AdapterError("finetune.epochs must be >= 1, finetune.batch_size >= 2 (in-batch negatives), "
                           "finetune.grad_accum >= 1 and finetune.lr > 0, got "
                           f"{cfg.finetune.epochs}, {cfg.finetune.batch_size}, {cfg.finetune.grad_accum} and "
                           f"{cfg.finetune.lr}")
    if cfg.finetune.max_seq_length is not None and cfg.finetune.max_seq_length < 8:
        raise AdapterError(f"finetune.max_seq_length must be at least 8, got {cfg.finetune.max_seq_length}")
    if out.exists() and not out.is_dir():
        raise AdapterError(f"{out}: exists and is not a folder")
    if (out / "modules.json").is_file():  # before loading anything: a model here is never overwritten
        raise AdapterError(f"{out}: already holds a model; choose another --out folder")
    train_qrels, val_qrels, how = train_val_qrels(dataset, cfg)
    model = load_model(cfg.encoder.model)
    full = int(model.get_embedding_dimension())
    dims = matryoshka_dims(cfg.evaluate.dims, full)
    select = select_dim(cfg.finetune.select_dim, dims)
    base_length = model.max_seq_length
    if cfg.finetune.max_seq_length is not None:
        model.max_seq_length = cfg.finetune.max_seq_length  # training only: the saved model keeps base_length

    pairs = [(dataset.queries[q], dataset.doc_text(c)) for q, rels in train_qrels.items() for c in rels]
    train_data = HFDataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
    run = {"base_model": cfg.encoder.model, "data_fingerprint": fingerprint(dataset, cfg.split.train_split),
           "validation": how, "train_queries": len(train_qrels), "dims": dims, "select_dim": select,
           "finetune_epochs": cfg.finetune.epochs, "finetune_batch_size": cfg.finetune.batch_size,
           "grad_accum": cfg.finetune.grad_accum, "finetune_lr": cfg.finetune.lr,
           "finetune_warmup": cfg.finetune.warmup, "max_seq_length": cfg.finetune.max_seq_length, "seed": cfg.seed}

    args = _training_args(cfg, out, select, model, progress)  # under torchrun this joins the process group
    main = args.process_index == 0
    with args.main_process_first(desc="checking the output folder"):
        resume = prepare_out(out, run, main=main)
    world = args.world_size
    mnrl = MultipleNegativesRankingLoss(model, gather_across_devices=world > 1)  # negatives from every rank
    loss = MatryoshkaLoss(model, mnrl, matryoshka_dims=dims)
    evaluator = RetrievalEvaluator(dataset, val_qrels, dims, select, batch_size=cfg.encoder.batch_size)
    before = read_json(resume / CLOCK_FILE)["seconds"] if resume else 0.0
    clock = clock_callback(before)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train_data, loss=loss,
                                         evaluator=evaluator, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(quiet_progress_callback())
    logger.info("fine-tuning %s on %d pairs (%d queries), validating on %d queries (%s); dims %s, %d rank%s",
                cfg.encoder.model, len(pairs), len(train_qrels), len(val_qrels), how, ",".join(map(str, dims)), world,
                "s" * (world > 1))

    base_file = out / CHECKPOINTS / BASE_FILE
    # The evaluator is called directly, never through trainer.evaluate(): that marks the model as prepared by
    # accelerate without wrapping it, and train() then skips the DDP wrapper, so no rank averages gradients and the
    # replicas drift apart. Rank 0 measures and writes the base scores first; the other ranks read them.
    with args.main_process_first(desc="scoring the base model"):
        if base_file.is_file():
            base_val = {int(d): m for d, m in read_json(base_file).items()}
        else:
            base_val = _by_dim(evaluator(model), dims, prefix="")
            if main:
                with atomic_write(base_file) as f:
                    json.dump(base_val, f)
    clock.start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = clock.seconds()
    trainer.accelerator.wait_for_everyone()  # every rank has loaded the best checkpoint before rank 0 removes it

    state = trainer.state
    evals = [e for e in state.log_history if f"eval_dim_{select}_{PRIMARY_METRIC}" in e]
    best = max(evals, key=lambda e: e[f"eval_dim_{select}_{PRIMARY_METRIC}"])  # first of equals, as the trainer
    best_val = _by_dim(best, dims)
    result = FinetuneResult(out, float(best["epoch"]), select, base_val, best_val, seconds, world,
                            str(resume) if resume else None, main)
    if not main:
        return result
    model.max_seq_length = base_length
    meta = {"format_version": FINETUNE_VERSION, **run, "dataset": str(dataset.path),
            "trained_on": cfg.split.train_split, "pairs": len(pairs), "val_queries": len(val_qrels),
            "chunks": len(dataset.corpus),
            "max_seq_length_trained": cfg.finetune.max_seq_length or base_length, "world_size": world,
            "train_seconds": seconds, "resumed": resume is not None, "best_epoch": best["epoch"],
            "best_step": best["step"], "val_base": base_val, "val_best": best_val,
            "history": _history(state.log_history, base_val, dims),
            "config": cfg.to_dict("encoder", "split", "evaluate", "finetune")}
    install(model, out, {"README.md": model_card(meta, out.name), FINETUNE_FILE: json.dumps(meta, indent=2)})
    logger.info("kept epoch %g: validation %s at dim %d %.4f (base %.4f); %.0f s", result.best_epoch,
                PRIMARY_METRIC, select, best_val[select][PRIMARY_METRIC], base_val[select][PRIMARY_METRIC], seconds)
    return result


def _history(log: list[dict[str, Any]], base_val: Results, dims: Sequence[int]) -> dict[str, list[dict[str, Any]]]:
    """Training curves from the trainer's log: the loss at each logged step, validation ndcg@10 at each dim by epoch
    (epoch 0 is the base model)."""
    key = f"eval_dim_{{}}_{PRIMARY_METRIC}"
    return {"loss": [{"epoch": e["epoch"], "step": e["step"], "loss": e["loss"], "lr": e.get("learning_rate")}
                     for e in log if "loss" in e],
            "val": [{"epoch": 0.0, "step": 0, PRIMARY_METRIC: {d: base_val[d][PRIMARY_METRIC] for d in dims}}]
            + [{"epoch": e["epoch"], "step": e["step"], PRIMARY_METRIC: {d: e[key.format(d)] for d in dims}}
               for e in log if key.format(dims[0]) in e]}


def model_card(meta: dict[str, Any], name: str) -> str:
    """A short README.md: base model, data, dims, the validation table and how it was trained."""
    dims = meta["dims"]
    rows = []
    for d in dims:
        b, f = meta["val_base"][d][PRIMARY_METRIC], meta["val_best"][d][PRIMARY_METRIC]
        change = pct_change(f, b)
        rows.append(f"| {d} | {b:.4f} | {f:.4f} | {f - b:+.4f} ({change}) |")
    front = ["library_name: sentence-transformers", f"base_model: {meta['base_model']}",
             "pipeline_tag: sentence-similarity", "tags: [sentence-transformers, matryoshka, retrieval]"]
    return card(front, name, [
        f"A Matryoshka fine-tune of `{meta['base_model']}` for retrieval, made by `adapter finetune`: "
        f"MatryoshkaLoss around MultipleNegativesRankingLoss at dims {', '.join(map(str, dims))}.",
        "",
        "## Data",
        "",
        f"{meta['pairs']:,} (question, chunk) pairs from {meta['train_queries']:,} questions of the "
        f"`{meta['trained_on']}` split of `{meta['dataset']}` (fingerprint `{meta['data_fingerprint']}`, "
        f"{meta['chunks']:,} chunks in the corpus). Validation: {meta['val_queries']:,} questions "
        f"({meta['validation']}).",
        "",
        f"## Validation {PRIMARY_METRIC}",
        "",
        f"Epoch {meta['best_epoch']:g} was kept (best {PRIMARY_METRIC} at dim {meta['select_dim']}).",
        "",
        "| dim | base | fine-tuned | change |",
        "| ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "## Training",
        "",
        f"{meta['finetune_epochs']} epoch{'s' * (meta['finetune_epochs'] != 1)}, batch "
        f"{meta['finetune_batch_size']} per rank x {meta['world_size']} rank(s), gradient accumulation "
        f"{meta['grad_accum']}, learning rate {meta['finetune_lr']:g} with {meta['finetune_warmup']:g} warmup then "
        f"cosine decay, texts truncated to {meta['max_seq_length_trained']} tokens in training and validation, seed "
        f"{meta['seed']}; {meta['train_seconds']:.0f} s of training wall time.",
        "",
        "## Use",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f'model = SentenceTransformer("path/to/{name}", truncate_dim={meta["select_dim"]})',
        "```",
        "",
        "Its vectors differ from the base model's: the whole corpus must be embedded again with it.",
    ])
