"""Malformed inputs and faults for every command, and the one check each must pass: used by tests/test_faults.py and
bench/bench_faults.py.

A case is a command line run as a user would (``python -m cli ...`` in a subprocess) inside a workspace of real files:
a valid dataset, an existing index, results file, adapter, exported model, a dataset to be replaced, and a folder of
bad sources. Each case must end with a non-zero exit, no traceback, at most 3 non-blank lines on stderr, every file
that existed before byte-identical and no new file left behind (a partial or damaged output). The embedding cache
lives outside the workspace: a run may add vectors of valid texts to it before failing on something else.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MAX_STDERR_LINES = 3


@dataclass(frozen=True)
class Case:
    command: str  # the command it exercises ("index build" for sub-commands)
    what: str  # the fault, in a few words
    argv: tuple[str, ...]  # after `python -m cli`, with {placeholders} from the workspace
    env: tuple[tuple[str, str], ...] = ()  # extra environment
    hidden: str = ""  # a secret the case holds: it must not appear on stderr


@dataclass
class Outcome:
    case: Case
    code: int
    stderr: str
    traceback: bool
    lines: int  # non-blank lines on stderr, as a terminal shows them
    changed: list[str]  # files that existed before and differ now
    left: list[str]  # files that did not exist before and do now (a partial or damaged output)

    @property
    def clean(self) -> bool:
        """The promise: a non-zero exit, one short error, no traceback, nothing changed or left behind."""
        return (self.code != 0 and not self.traceback and 0 < self.lines <= MAX_STDERR_LINES and not self.changed
                and not self.left and not (self.case.hidden and self.case.hidden in self.stderr))


def _w(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def build_workspace(root: Path, model: str, cache: Path, *, light: bool = False) -> dict[str, str]:
    """Write the workspace under ``root`` (a valid dataset, existing outputs, bad sources); returns the placeholders.

    ``model`` is the encoder every case uses; an adapter for it is trained here by the real command, and the index,
    results, exported model and dataset are made by theirs. ``light`` writes placeholder bytes for those instead (for
    cases that must fail before reading them: the quick table test)."""
    from tests.conftest import CHUNKS, QUESTIONS, write_dataset

    root.mkdir(parents=True, exist_ok=True)
    ds = write_dataset(root / "ds", {"train": list(QUESTIONS), "test": list(QUESTIONS)})
    bad = root / "bad"
    w = {"ds": str(ds), "model": model, "root": str(root), "bad": str(bad)}
    env = {**os.environ, "ADAPTER_CACHE": str(cache), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    existing = root / "existing"
    existing.mkdir(exist_ok=True)
    for argv in (["train", str(ds), "--out", str(existing / "adapter.safetensors"), "--model", model, "--set",
                  "train.epochs=2"],
                 ["index", "build", str(ds), "--out", str(existing / "index.faiss"), "--model", model],
                 ["evaluate", str(ds), "--model", model, "--json", str(existing / "results.json")],
                 ["export", str(existing / "adapter.safetensors"), "--out", str(existing / "exported"), "--model",
                  model],
                 ["convert", str(ds), "--out", str(existing / "dataset")]):
        if light:
            break
        r = subprocess.run([sys.executable, "-m", "cli", "-q", *argv], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"workspace setup failed: {' '.join(argv)}\n{r.stderr[-2000:]}")
    if light:
        for name in ("adapter.safetensors", "index.faiss", "results.json", "exported/modules.json"):
            _w(existing / name, b"placeholder")
        shutil.copytree(ds, existing / "dataset")
    w.update({k: str(existing / v) for k, v in {"adapter": "adapter.safetensors", "index": "index.faiss",
                                                  "results": "results.json", "exported": "exported",
                                                  "dataset": "dataset"}.items()})
    _w(existing / "report" / "report.md", "an earlier report\n")
    w["report"] = str(existing / "report")
    _w(existing / "out.safetensors", b"not mine")
    w["taken"] = str(existing / "out.safetensors")

    chunks = [{"chunk_id": cid, "text": text, "questions": [q for q, rel in QUESTIONS.values() if cid in rel][:1]
               or ["what is this about"]} for cid, text in CHUNKS.items()]

    def chunk_source(name: str, **change) -> None:
        rows = [dict(c) for c in chunks]
        rows[0].update(change)
        _w(bad / f"{name}.json", json.dumps(rows))

    # convert: texts and ids the writer cannot write or its own reader would not read back the same
    _w(bad / "surrogate.json", json.dumps(chunks)[:-2] + ', "questions": ["what is \\ud83d?"]}]')
    chunk_source("surrogate_text", text="the pump \ud83d is here")
    for name, cid in {"tab": "a\tb", "newline": "a\nb", "quote": '"a', "spaces": " a ", "empty": ""}.items():
        chunk_source(f"id_{name}", chunk_id=cid)
    chunk_source("text_number", text=12345)
    chunk_source("text_nan", text=float("nan"))
    chunk_source("text_list", text=["a", "b"])
    chunk_source("question_nan", questions=[float("nan")])
    _w(bad / "not_a_list.json", json.dumps({"chunks": 3}))
    _w(bad / "truncated.json", json.dumps(chunks)[:200])
    _w(bad / "empty.json", "")
    _w(bad / "latin1.csv", "question,chunk\nqu\xe9 es esto,el caf\xe9 del barrio\n".encode("latin-1"))
    _w(bad / "utf16.jsonl", '{"question": "what", "chunk": "text"}\n'.encode("utf-16"))
    _w(bad / "latin1.jsonl", '{"question": "caf\xe9", "chunk": "text"}\n'.encode("latin-1"))
    _w(bad / "unterminated.csv", 'question,chunk\nwhat is it,"the text goes on\nand on\n')
    _w(bad / "no_columns.csv", "a,b\n1,2\n")
    _w(bad / "header_only.csv", "question,chunk\n")
    _w(bad / "extra_cols.csv", "question,chunk\nwhat,text,extra\n")
    _w(bad / "pairs_nan.jsonl", '{"question": NaN, "chunk": "text"}\n')
    _w(bad / "bom.jsonl", codecs.BOM_UTF8 + b'{"question": "what", "chunk": "text"}\n{"question": 1, "chunk": 2}\n')
    _w(bad / "llamaindex_bad.json", json.dumps({"queries": {"q": "what"}, "corpus": {"c": "text"},
                                                "relevant_docs": {"q": ["missing"]}}))
    (bad / "somedir").mkdir(parents=True, exist_ok=True)

    # dataset folders with one thing wrong each
    def broken(name: str, **files: str | bytes) -> None:
        folder = write_dataset(bad / name, {"train": list(QUESTIONS), "test": list(QUESTIONS)})
        for rel, text in files.items():
            _w(folder / rel.replace("__", "/"), text)

    good_corpus = (ds / "corpus.jsonl").read_text()
    broken("ds_latin1", **{"corpus.jsonl": good_corpus.replace("litre", "litr\xe9").encode("latin-1")})
    broken("ds_utf16", **{"queries.jsonl": (ds / "queries.jsonl").read_text().encode("utf-16")})
    broken("ds_qrels_latin1", **{"qrels__train.tsv": "query-id\tcorpus-id\tscore\nq_burst\tburst\t1\xe9\n"
                                 .encode("latin-1")})
    broken("ds_qrels_half", **{"qrels__test.tsv": "query-id\tcorpus-id\tscore\nq_burst\tburst\t0.5\n"})
    broken("ds_qrels_huge", **{"qrels__test.tsv": "query-id\tcorpus-id\tscore\nq_burst\t" + "b" * 140_000 + "\t1\n"})
    broken("ds_qrels_nan", **{"qrels__test.tsv": "query-id\tcorpus-id\tscore\nq_burst\tburst\tnan\n"})
    broken("ds_text_number", **{"corpus.jsonl": good_corpus + '{"_id": "n", "text": 7}\n'})
    broken("ds_text_nan", **{"corpus.jsonl": good_corpus + '{"_id": "n", "text": NaN}\n'})
    broken("ds_text_list", **{"corpus.jsonl": good_corpus + '{"_id": "n", "text": ["a"]}\n'})
    broken("ds_surrogate", **{"corpus.jsonl": good_corpus + '{"_id": "s", "text": "pump \\ud83d"}\n'})
    broken("ds_id_float", **{"corpus.jsonl": good_corpus + '{"_id": 1.5, "text": "x"}\n'})
    broken("ds_no_qrels_header", **{"qrels__test.tsv": "q_burst\tburst\t1\n"})
    broken("ds_empty_corpus", **{"corpus.jsonl": ""})
    other = write_dataset(bad / "other_ds", {"test": list(QUESTIONS)})  # another corpus: not the index's
    _w(other / "corpus.jsonl", (other / "corpus.jsonl").read_text() + _jsonl([{"_id": "extra", "text": "more"}]))

    # an adapter file whose matrix is all zeros, and an index of another dimension
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    if not light:  # an all-zeros adapter (of the real one) and an index of another dimension
        tensors = load_file(w["adapter"])
        with safe_open(w["adapter"], framework="np") as f:
            meta = f.metadata()
        save_file({k: v * 0 for k, v in tensors.items()}, str(_w(bad / "zeros.safetensors", b"")), metadata=meta)
        import faiss
        import numpy as np

        small = faiss.IndexFlatIP(3)
        small.add(np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]])
        faiss.write_index(small, str(bad / "dim3.faiss"))
    _w(bad / "empty.md", "")
    _w(bad / "blank.txt", "   \n\n")
    _w(bad / "docs" / "a.md", "A short handbook page about pumps and valves. " * 20)
    _w(bad / "prompt_no_chunk.txt", "write {n} questions")
    w.update(write_trust_files(root, model))
    w.update(audit_files(root, existing))
    pristine = root.with_name(root.name + ".pristine")
    shutil.rmtree(pristine, ignore_errors=True)
    shutil.copytree(root, pristine, symlinks=True)
    return w


def cases() -> list[Case]:
    """Every case, by command."""
    m = ("--model", "{model}")
    c: list[Case] = []

    def add(command: str, what: str, *argv: str, env: dict[str, str] | None = None) -> None:
        c.append(Case(command, what, tuple(argv), tuple((env or {}).items())))

    # convert
    add("convert", "lone surrogate in a question, --force over a dataset", "convert", "{bad}/surrogate.json",
        "--out", "{dataset}", "--force")
    add("convert", "lone surrogate in a question, new folder", "convert", "{bad}/surrogate.json", "--out",
        "{root}/new_ds")
    add("convert", "lone surrogate in a chunk text", "convert", "{bad}/surrogate_text.json", "--out", "{root}/new_ds")
    for name in ("tab", "newline", "quote", "spaces", "empty"):
        add("convert", f"chunk id with {name}", "convert", f"{{bad}}/id_{name}.json", "--out", "{root}/new_ds")
    for name in ("number", "nan", "list"):
        add("convert", f"chunk text is a {name}", "convert", f"{{bad}}/text_{name}.json", "--out", "{root}/new_ds")
    add("convert", "question is NaN", "convert", "{bad}/question_nan.json", "--out", "{root}/new_ds")
    for name in ("not_a_list.json", "truncated.json", "empty.json", "latin1.csv", "utf16.jsonl", "latin1.jsonl",
                 "unterminated.csv", "no_columns.csv", "header_only.csv", "extra_cols.csv",
                 "pairs_nan.jsonl", "bom.jsonl", "llamaindex_bad.json"):
        add("convert", name, "convert", f"{{bad}}/{name}", "--out", "{root}/new_ds")
    for fmt in ("pairs", "chunks", "llamaindex"):
        add("convert", f"a folder as --format {fmt}", "convert", "{bad}/somedir", "--out", "{root}/new_ds",
            "--format", fmt)
    add("convert", "over an existing dataset without --force", "convert", "{ds}", "--out", "{dataset}")
    add("convert", "onto its own source folder", "convert", "{dataset}", "--out", "{dataset}", "--force")
    add("convert", "--out is a file", "convert", "{ds}", "--out", "{taken}")
    # split
    for opt, val in (("--set", "split.test_fraction=0"), ("--set", "split.test_fraction=1.5"), ("--set",
                                                                                                "split.test_fraction=nan"),
                     ("--set", "split.dev_fraction=-0.1"), ("--set", "split.dev_fraction=inf"), ("--seed", "-1"),
                     ("--by", "x")):
        add("split", f"{opt} {val}", "split", "{ds}", opt, val)
    for name in ("ds_latin1", "ds_utf16", "ds_qrels_latin1", "ds_qrels_huge", "ds_text_number", "ds_text_nan",
                 "ds_text_list", "ds_id_float", "ds_empty_corpus", "ds_no_qrels_header"):
        add("split", f"dataset {name[3:]}", "split", f"{{bad}}/{name}")
    # embed
    add("embed", "lone surrogate in a chunk", "embed", "{bad}/ds_surrogate", *m)
    add("embed", "latin-1 corpus", "embed", "{bad}/ds_latin1", *m)
    add("embed", "not a model", "embed", "{ds}", "--model", "{bad}/somedir")
    # evaluate
    add("evaluate", "--json over an existing file", "evaluate", "{ds}", *m, "--json", "{results}")
    add("evaluate", "--json into a missing folder", "evaluate", "{ds}", *m, "--json", "{root}/nowhere/r.json")
    add("evaluate", "index of another dimension", "evaluate", "{ds}", *m, "--store", "faiss:{bad}/dim3.faiss")
    add("evaluate", "qrels score 0.5", "evaluate", "{bad}/ds_qrels_half", *m)
    add("evaluate", "qrels score nan", "evaluate", "{bad}/ds_qrels_nan", *m)
    add("evaluate", "--dims 0", "evaluate", "{ds}", *m, "--dims", "0")
    add("evaluate", "all-zeros adapter", "evaluate", "{ds}", *m, "--adapter", "{bad}/zeros.safetensors")
    # train
    for opt, val in (("--set", "train.lr=nan"), ("--set", "train.lr=inf"), ("--set", "train.lr=-1"), ("--set",
                                                                                                      "train.temperature=0"),
                     ("--set", "train.temperature=nan"), ("--set", "train.margin=nan"), ("--set", "train.margin=-1"),
                     ("--set", "train.identity_penalty=-1"),
                     ("--set", "train.identity_penalty=nan"), ("--seed", "-1"), ("--set", "train.epochs=-1"),
                     ("--set", "train.batch_size=0"),
                     ("--rank", "0")):
        add("train", f"{opt} {val}", "train", "{ds}", "--out", "{root}/new.safetensors", *m, opt, val)
    add("train", "--out exists", "train", "{ds}", "--out", "{adapter}", *m)
    add("train", "--out in a missing folder", "train", "{ds}", "--out", "{root}/nowhere/a.safetensors", *m)
    add("train", "--out under a file", "train", "{ds}", "--out", "{taken}/a.safetensors", *m)
    # search
    add("search", "empty query", "search", "", "--store", "faiss:{index}", "--adapter", "{adapter}", *m)
    add("search", "blank query", "search", "   ", "--store", "faiss:{index}", "--adapter", "{adapter}", *m)
    add("search", "-k 0", "search", "pump", "--store", "faiss:{index}", "--adapter", "{adapter}", *m, "-k", "0")
    add("search", "--data not the index's dataset", "search", "pump", "--store", "faiss:{index}", "--adapter",
        "{adapter}", *m, "--data", "{bad}/other_ds")
    add("search", "all-zeros adapter", "search", "pump", "--store", "faiss:{index}", "--adapter",
        "{bad}/zeros.safetensors", *m)
    add("search", "index of another dimension", "search", "pump", "--store", "faiss:{bad}/dim3.faiss", "--adapter",
        "{adapter}", *m)
    # index build
    add("index build", "--out exists", "index", "build", "{ds}", "--out", "{index}", *m)
    add("index build", "--out in a missing folder", "index", "build", "{ds}", "--out", "{root}/nowhere/i.faiss", *m)
    add("index build", "lone surrogate in a chunk", "index", "build", "{bad}/ds_surrogate", "--out",
        "{root}/new.faiss", *m)
    # export
    add("export", "--out exists", "export", "{adapter}", "--out", "{exported}", *m)
    add("export", "--out under a file", "export", "{adapter}", "--out", "{taken}/model", *m)
    add("export", "--out is the current folder's parent", "export", "{adapter}", "--out", "..", "--force", *m)
    add("export", "--out is the current folder", "export", "{adapter}", "--out", ".", "--force", *m)
    add("export", "all-zeros adapter", "export", "{bad}/zeros.safetensors", "--out", "{root}/new_model", *m)
    # chunk
    add("chunk", "an empty .md", "chunk", "{bad}/empty.md", "--out", "{root}/chunked")
    add("chunk", "a blank .txt", "chunk", "{bad}/blank.txt", "--out", "{root}/chunked")
    for opt, val in (("--size", "0"), ("--size", "-5"), ("--overlap", "-1"), ("--overlap", "900")):
        add("chunk", f"{opt} {val}", "chunk", "{bad}/docs", "--out", "{root}/chunked", "--unit", "chars", opt, val)
    add("chunk", "over an existing corpus", "chunk", "{bad}/docs", "--out", "{dataset}", "--unit", "chars")
    # generate (no server is reached: each fails before or at the first request)
    dead = {"OPENAI_API_KEY": "sk-test-0123456789abcdef"}
    add("generate", "dead endpoint", "generate", "{dataset}", "--base-url", "http://127.0.0.1:9/v1", env=dead)
    add("generate", "--base-url not a url", "generate", "{dataset}", "--base-url", "not a url", env=dead)
    add("generate", "no API key", "generate", "{dataset}", "--base-url", "http://127.0.0.1:9/v1",
        env={"OPENAI_API_KEY": ""})
    add("generate", "prompt without {chunk}", "generate", "{dataset}", "--prompt", "{bad}/prompt_no_chunk.txt",
        env=dead)
    for opt, val in (("--set", "llm.temperature=nan"), ("--set", "llm.temperature=-1"), ("--set",
                                                                                         "llm.request_timeout=0"),
                                                                                         ("--set",
                                                                                          "llm.request_timeout=inf"),
                     ("--set", "llm.concurrency=0"), ("--set", "llm.dedup_threshold=nan"), ("--questions-per-chunk",
                                                                                            "0"),
                     ("--set", "llm.max_retries=-1")):
        add("generate", f"{opt} {val}", "generate", "{dataset}", opt, val, env=dead)
    # finetune
    for opt, val in (("--set", "finetune.lr=nan"), ("--set", "finetune.lr=inf"), ("--epochs", "0"),
                     ("--set", "finetune.batch_size=1"), ("--seed", "-1"),
                     ("--set", "finetune.max_seq_length=0"), ("--set", "finetune.select_dim=7")):
        add("finetune", f"{opt} {val}", "finetune", "{ds}", "--out", "{root}/ft", *m, opt, val)
    add("finetune", "--out holds a model", "finetune", "{ds}", "--out", "{exported}", *m)
    # compare
    for val in ("0", "-1"):
        add("compare", f"--set report.bootstrap_samples={val}", "compare", "{ds}", "--out", "{root}/cmp",
            "--base-model", "{model}", "--set", f"report.bootstrap_samples={val}")
    add("compare", "--out holds a report", "compare", "{ds}", "--out", "{report}", "--base-model", "{model}")
    c += audit_cases()  # security audit: sizes, deadlines, integrity
    return c + trust_and_secret_cases()


# ---------------------------------------------------------------------------------------------------------------
# security audit: sizes, deadlines, integrity (#24). Files that declare far more than they hold live beside the
# workspace (``{audit}``), outside what a case may change: hashing or copying a sparse 3.6 GB file is not the point.


def audit_files(root: Path, existing: Path) -> dict[str, str]:
    """Write the audit's crafted inputs; returns their placeholders."""
    import struct

    audit = root.with_name(root.name + ".audit")
    shutil.rmtree(audit, ignore_errors=True)
    audit.mkdir(parents=True)
    header = {"format_version": 2, "base_model": "m@0123456789ab", "dim": 384, "form": "full", "rank": None,
              "bias": False}

    def safetensors(name: str, meta: str, tensor: str = "F32", shape: tuple[int, ...] = (384, 384),
                    sparse: bool = False) -> None:
        nbytes = shape[0] * shape[1] * (2 if tensor.endswith("16") else 4)
        head = json.dumps({"__metadata__": {"adapter": meta},
                           "weight": {"dtype": tensor, "shape": list(shape), "data_offsets": [0, nbytes]}}).encode()
        head += b" " * (-len(head) % 8)
        with open(audit / name, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            if sparse:
                f.truncate(8 + len(head) + nbytes)  # holes: a few KiB on disk
            else:
                f.write(b"\0\0\x80?" * (nbytes // 4))  # 1.0 in every float32

    safetensors("sparse.safetensors", json.dumps(header), shape=(30000, 30000), sparse=True)
    safetensors("bf16.safetensors", json.dumps(header), tensor="BF16")
    safetensors("nested.safetensors", "[" * 100_000 + "]" * 100_000)
    safetensors("history.safetensors", json.dumps({**header, "history": {"loss": "x", "val": 3},
                                                   "estimates": [1, 2]}))
    flat = bytearray(b"IxFI" + struct.pack("<iqqq?i", 384, 625_000_000 // 384, 1 << 20, 1 << 20, True, 0))
    flat += struct.pack("<Q", 625_000_000)  # 2.5 GB of float32 declared ...
    _w(audit / "bomb.faiss", bytes(flat) + bytes(61 - len(flat)))  # ... in 61 bytes, as the audit found
    _w(audit / "rag_missing.json", json.dumps({"k": 3, "systems": {"base": {"accuracy": 0.5}}}))
    _w(existing / "partial" / "results.json", "{}\n")  # a compare folder without report.md
    return {"audit": str(audit), "partial": str(existing / "partial")}


COMPLETION = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "ok " * 40}}]}).encode()


class Drip:
    """A server on 127.0.0.1 that answers each request with a whole chat completion sent one byte every ``gap``
    seconds, its status line and headers included (``part="headers"``) or only its body (``part="body"``); it stops
    when the client hangs up, and serves at most ``connections``. ``sent`` holds the bytes each connection got out:
    with a timeout per read (the old client) the client waits for all of them, with a deadline it hangs up long
    before."""

    def __init__(self, part: str, gap: float = 0.05, connections: int = 20):
        self.part, self.gap, self.connections, self.sent = part, gap, connections, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    @property
    def response(self) -> bytes:
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(COMPLETION)}\r\n"
                "Connection: close\r\n\r\n").encode()
        return head + COMPLETION

    def __enter__(self) -> Drip:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close()

    def _serve(self) -> None:
        for _ in range(self.connections):  # bounded
            while not self.stop.is_set():
                try:
                    conn, _ = self.sock.accept()
                    break
                except TimeoutError:
                    continue
            else:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, body = data.split(b"\r\n\r\n", 1)
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(body) < length:
                    body += conn.recv(65536)
                out = self.response
                at = 0 if self.part == "headers" else out.index(b"\r\n\r\n") + 4
                if at:
                    conn.sendall(out[:at])
                sent = at
                for i in range(at, len(out)):
                    if self.stop.wait(self.gap):
                        break
                    try:
                        conn.sendall(out[i:i + 1])
                    except OSError:  # the client hung up
                        break
                    sent += 1
                self.sent.append(sent)


def audit_cases() -> list[Case]:
    """The security audit's cases (#24): files and replies that declare more than they hold, outputs that were
    replaced or checked too late."""
    m = ("--model", "{model}")
    c: list[Case] = []

    def add(command: str, what: str, *argv: str) -> None:
        c.append(Case(command, what, tuple(argv)))

    add("search", "adapter declaring 30000x30000 in a 4 KiB sparse file", "search", "pump", "--store", "faiss:{index}",
        "--adapter", "{audit}/sparse.safetensors", *m)
    add("search", "FAISS file claiming 2.5 GB in 61 bytes", "search", "pump", "--store", "faiss:{audit}/bomb.faiss",
        "--adapter", "{adapter}", *m)
    add("evaluate", "FAISS file claiming 2.5 GB in 61 bytes", "evaluate", "{ds}", *m, "--store",
        "faiss:{audit}/bomb.faiss")
    add("evaluate", "adapter with a bfloat16 tensor", "evaluate", "{ds}", *m, "--adapter", "{audit}/bf16.safetensors")
    add("evaluate", "adapter metadata nested 10^5 deep", "evaluate", "{ds}", *m, "--adapter",
        "{audit}/nested.safetensors")
    add("evaluate", "adapter with wrong-typed history and estimates", "evaluate", "{ds}", *m, "--adapter",
        "{audit}/history.safetensors")
    add("train", "--json over an existing file", "train", "{ds}", "--out", "{root}/new.safetensors", *m, "--json",
        "{results}")
    add("train", "--json into a missing folder", "train", "{ds}", "--out", "{root}/new.safetensors", *m, "--json",
        "{root}/nowhere/t.json")
    add("compare", "--out holds results.json but no report.md", "compare", "{ds}", "--out", "{partial}",
        "--base-model", "{model}")
    add("compare", "--rag rag.json missing keys", "compare", "{ds}", "--out", "{root}/cmp", "--base-model",
        "{model}", "--rag", "{audit}/rag_missing.json")
    return c


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_case(case: Case, w: dict[str, str], cache: Path, *, timeout: float = 300) -> Outcome:
    """Run one case in the workspace and judge it."""
    root = Path(w["root"])
    before = snapshot(root)
    argv = [a.format(**w) for a in case.argv]
    env = {**os.environ, "ADAPTER_CACHE": str(cache), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "OPENAI_API_KEY": "", **dict(case.env)}
    cwd = root / "cwd" / "here"  # an empty folder: `--out ..` and `--out .` can reach nothing else
    cwd.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "cli", *argv], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    after = snapshot(root)
    # what a terminal shows: a progress bar redrawn after carriage returns is one line
    lines = [line.split("\r")[-1] for line in r.stderr.split("\n")]
    lines = [line for line in lines if line.strip()]
    outcome = Outcome(case, r.returncode, r.stderr, "Traceback (most recent call last)" in r.stderr, len(lines),
                      sorted(k for k in before if before[k] != after.get(k)), sorted(set(after) - set(before)))
    _restore(root, before)
    return outcome


def _restore(root: Path, before: dict[str, str]) -> None:
    """Put the workspace back as it was (from its pristine copy), so one case's damage cannot hide another's."""
    pristine = root.with_name(root.name + ".pristine")
    for p in sorted(root.rglob("*"), reverse=True):
        rel = str(p.relative_to(root))
        if p.is_symlink() or p.is_file():
            if rel not in before:
                p.unlink()
        elif p.is_dir() and not (pristine / rel).is_dir():
            shutil.rmtree(p)
    for rel, digest in before.items():
        target, source = root / rel, pristine / rel
        if not target.is_file() or hashlib.sha256(target.read_bytes()).hexdigest() != digest:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_all(w: dict[str, str], cache: Path, selected: list[Case] | None = None) -> Iterator[Outcome]:
    for case in selected or cases():
        yield run_case(case, w, cache)


# ---------------------------------------------------------------------------------------------------------------
# Embeddings and stores (#11; embed's block). These cases need two services of their own, so they are not in
# ``cases()``: run them inside ``embedding_store_services(w, model)``, which starts them and adds their placeholders.

EMBED_KEY = "sk-fault-right-key-0123456789abcdef"
PG_PASSWORD = "s3cret-pw-never-shown"


def embedding_store_cases() -> list[Case]:
    """Bad input to the OpenAI-compatible backend and to the stores, by command; ``EMBED_STORE_EXPECT`` holds what
    each one's error must say."""
    remote = ("--model", "openai:fake-minilm", "--embedding-base-url", "{embeddings_url}")
    wrong_key = {"OPENAI_API_KEY": "sk-wrong-key-0123456789abcdef"}
    key = {"OPENAI_API_KEY": EMBED_KEY}
    m = ("--model", "{model}")
    out = ("--out", "{root}/new.safetensors")
    c: list[Case] = []

    def add(command: str, what: str, *argv: str, env: dict[str, str] | None = None) -> None:
        c.append(Case(command, what, tuple(argv), tuple((env or {}).items())))

    add("embed", "wrong API key (401)", "embed", "{ds}", *remote, env=wrong_key)
    add("train", "wrong API key (401)", "train", "{ds}", *out, *remote, env=wrong_key)
    add("evaluate", "unknown embedding model (404)", "evaluate", "{ds}", "--model", "openai:no-such-model",
        "--embedding-base-url", "{embeddings_url}", env=key)
    add("embed", "closed port", "embed", "{ds}", "--model", "openai:fake-minilm", "--embedding-base-url",
        "http://127.0.0.1:9/v1", "--set", "embedding.request_timeout=60", env=key)
    add("train", "FAISS ids that are not corpus ids", "train", "{ds}", *out, *m, "--store",
        "faiss:{stores}/int_ids.faiss")
    add("train", "vector file of another dimension", "train", "{ds}", *out, *m, "--store",
        "vectors:{stores}/dim3.npy,{stores}/corpus_ids.txt")
    add("train", "pgvector table without a vector column", "train", "{ds}", *out, *m, "--store",
        "pgvector:{pg}/plain")
    add("evaluate", "pgvector ids that are not corpus ids", "evaluate", "{ds}", *m, "--store",
        "pgvector:{pg}/strangers")
    add("evaluate", "DSN that does not connect", "evaluate", "{ds}", *m, "--store",
        f"pgvector:postgresql://bob:{PG_PASSWORD}@127.0.0.1:9/db?connect_timeout=5/chunks")
    return c


EMBED_STORE_EXPECT = {  # what -> a regex the one line must match
    "wrong API key (401)": r"{embeddings_url}: HTTP 401 .*Incorrect API key",
    "unknown embedding model (404)": r"{embeddings_url}: HTTP 404 .*no-such-model",
    "closed port": r"http://127\.0\.0\.1:9/v1: cannot connect",
    "FAISS ids that are not corpus ids": r"int_ids\.faiss: holds no vector for .* its ids must be corpus ids",
    "vector file of another dimension": r"dim3\.npy holds 3-dimensional vectors, .* makes \d+",
    "pgvector table without a vector column": r"#plain: no vector column \(columns: chunk_id text, body text\)",
    "pgvector ids that are not corpus ids": r"#strangers: holds no vector for .* its ids must be corpus ids",
    "DSN that does not connect": r"postgresql://bob@127\.0\.0\.1:9/db: cannot connect to PostgreSQL",
}


@contextmanager
def embedding_store_services(w: dict[str, str], model: Any) -> Iterator[dict[str, str]]:
    """The inputs ``embedding_store_cases`` read, beside the workspace (outside what a case may change): a fake
    OpenAI-compatible server (tests/fake_embeddings.py, serving ``model``, a loaded sentence-transformers model)
    that takes ``EMBED_KEY`` only, a real PostgreSQL with pgvector (pgserver) holding two bad tables, and vector
    files. Yields the placeholders with theirs added; everything is stopped afterwards."""
    import tempfile

    import faiss
    import numpy as np
    import pgserver
    import psycopg
    from pgvector.psycopg import register_vector

    from adapter.data import load_dataset
    from tests.fake_embeddings import FakeEmbeddings

    root = Path(w["root"])
    stores = root.with_name(root.name + ".stores")
    stores.mkdir(exist_ok=True)
    cids = list(load_dataset(w["ds"]).corpus)
    rng = np.random.default_rng(0)
    dim3 = rng.normal(size=(len(cids), 3)).astype(np.float32)
    dim3 /= np.linalg.norm(dim3, axis=1, keepdims=True)
    np.save(stores / "dim3.npy", dim3)
    _w(stores / "corpus_ids.txt", "".join(f"{c}\n" for c in cids))
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(3))
    index.add_with_ids(dim3, np.arange(1000, 1000 + len(cids), dtype=np.int64))
    faiss.write_index(index, str(stores / "int_ids.faiss"))
    server = pgserver.get_server(tempfile.mkdtemp(prefix="adapter-pg-"), cleanup_mode="delete")
    try:
        server.psql("CREATE EXTENSION IF NOT EXISTS vector;")
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            register_vector(conn)
            conn.execute("CREATE TABLE plain (chunk_id text PRIMARY KEY, body text)")
            conn.execute("CREATE TABLE strangers (id text PRIMARY KEY, embedding vector(3))")
            for i, (cid, v) in enumerate(zip(cids, dim3, strict=True)):
                conn.execute("INSERT INTO plain VALUES (%s, %s)", (cid, "text"))
                conn.execute("INSERT INTO strangers VALUES (%s, %s)", (f"other-{i}", v))
        with FakeEmbeddings(model, api_key=EMBED_KEY) as fake:
            yield {**w, "stores": str(stores), "pg": server.get_uri(), "embeddings_url": fake.url}
    finally:
        server.cleanup()
        shutil.rmtree(stores, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# security audit: trust and secrets (#24). A reranker or start-model folder that names code of its own, in each of
# the three ways the audit found, must be refused in one line with nothing of it run: its code writes a marker file
# into the workspace, so a run that imported it leaves a new file (not clean). A password in a URL or a DSN must not
# reach stderr (``Case.hidden``).

SECRET = "pw-fault-never-shown-7781"
TRUST_WAYS = {"tokenizer": "auto_map in tokenizer_config.json",
              "subfolder": "a Transformer module in a subfolder whose config.json has auto_map",
              "activation": "activation_fn importing a module of its own choosing"}
MARKER_MODULE = "adapter_marker_mod"  # the module activation_fn names, importable from the working folder


def _marker_code(marker: Path) -> str:
    """Python that leaves ``marker`` the moment it is imported, with the classes each crafted config names."""
    return (f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
            "from transformers import BertConfig, BertModel, BertTokenizerFast\n\n\n"
            "class EvilTokenizer(BertTokenizerFast):\n    pass\n\n\n"
            "class EvilConfig(BertConfig):\n    pass\n\n\n"
            "class EvilModel(BertModel):\n    config_class = EvilConfig\n\n\n"
            "class Boom:\n    def __call__(self, x):\n        return x\n")


def crafted_reranker(src: Path, dest: Path, way: str, marker: Path, module_dir: Path) -> Path:
    """A copy of the cross-encoder folder ``src`` (from ``adapter rerank-train``'s start: Transformer + CosineHead)
    at ``dest`` whose files make a loader run code that writes ``marker``, by ``way`` (a key of TRUST_WAYS); for
    "activation" the module is written to ``module_dir`` (a folder on the loading process's import path)."""
    shutil.copytree(src, dest)

    def edit(path: Path, **change: Any) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))

    if way == "tokenizer":
        _w(dest / "evil_code.py", _marker_code(marker))
        edit(dest / "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil_code.EvilTokenizer",
                                                                          "evil_code.EvilTokenizer"]})
    elif way == "subfolder":
        sub = dest / "0_Transformer"
        sub.mkdir()
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "sentence_bert_config.json"):
            shutil.copy(dest / name, sub / name)
        _w(dest / "evil_code.py", _marker_code(marker))
        edit(sub / "config.json", auto_map={"AutoConfig": "evil_code.EvilConfig", "AutoModel": "evil_code.EvilModel"})
        modules = json.loads((dest / "modules.json").read_text())
        modules[0]["path"] = "0_Transformer"
        (dest / "modules.json").write_text(json.dumps(modules))
    elif way == "activation":
        _w(module_dir / f"{MARKER_MODULE}.py", _marker_code(marker))
        edit(dest / "config_sentence_transformers.json", activation_fn=f"{MARKER_MODULE}.Boom")
    else:
        raise ValueError(way)
    return dest


def write_trust_files(root: Path, model: str) -> dict[str, str]:
    """A real cross-encoder on the tests' tiny BERT (outside ``root``: read-only inputs) and its three crafted
    copies; their markers and the activation's module inside ``root`` (the cases' working folder is on their
    import path, as ``python -m`` puts it). Returns the placeholders ``{reranker_<way>}``."""
    from adapter.rerank import start_model
    from tests.conftest import build_tiny_model

    trust = root.with_name(root.name + ".trust")
    shutil.rmtree(trust, ignore_errors=True)
    tiny = build_tiny_model(trust / "tiny")
    start_model(str(tiny), 48)[0].save(str(trust / "ce"))
    cwd = root / "cwd" / "here"
    cwd.mkdir(parents=True, exist_ok=True)
    return {f"reranker_{way}": str(crafted_reranker(trust / "ce", trust / way, way, root / f"RAN-{way}", cwd))
            for way in TRUST_WAYS}


def trust_and_secret_cases() -> list[Case]:
    """The crafted folders through every command that loads one, and passwords in URLs and DSNs."""
    m = ("--model", "{model}")
    c: list[Case] = []

    def add(command: str, what: str, *argv: str, env: dict[str, str] | None = None, hidden: str = "") -> None:
        c.append(Case(command, what, tuple(argv), tuple((env or {}).items()), hidden))

    for way, how in TRUST_WAYS.items():
        add("evaluate", f"--reranker naming code: {how}", "evaluate", "{ds}", *m, "--reranker",
            f"{{reranker_{way}}}", "--set", "rerank.k=3")
        add("rerank-train", f"--model naming code: {how}", "rerank-train", "{ds}", "--out", "{root}/rr", "--model",
            f"{{reranker_{way}}}", "--encoder", "{model}", "--set", "rerank.k=3")
    add("compare", f"--reranker naming code: {TRUST_WAYS['activation']}", "compare", "{ds}", "--out", "{root}/cmp",
        "--base-model", "{model}", "--reranker", "{reranker_activation}", "--set",
        "rerank.k=3")
    dead = {"OPENAI_API_KEY": "sk-test-0123456789abcdef"}
    add("generate", "--base-url ftp:// with a password", "generate", "{dataset}", "--base-url",
        f"ftp://bob:{SECRET}@127.0.0.1:9/v1", env=dead, hidden=SECRET)
    add("generate", "--base-url with a password, dead endpoint", "generate", "{dataset}", "--base-url",
        f"http://bob:{SECRET}@127.0.0.1:9/v1", env=dead, hidden=SECRET)
    add("evaluate", "--pgvector DSN with a password that libpq cannot parse", "evaluate", "{ds}", *m, "--store",
        f"pgvector:postgresql://bob:{SECRET}@[::1/db/chunks", hidden=SECRET)
    return c
