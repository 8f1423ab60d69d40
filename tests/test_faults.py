"""Bad input and faults (issue #13): each reproduction as a test, and a property test of the readers.

The full table over every command (subprocesses, the real CLI) is tests/fault_cases.py, run by test_fault_table and
bench/bench_faults.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter.data import convert, load_dataset, save_dataset
from adapter.errors import AdapterError
from cli import main
from tests.conftest import QUESTIONS, split_tiny, tree, write_dataset


def chunks_source(path: Path, **change) -> Path:
    rows = [{"chunk_id": "c1", "text": "Valves isolate a burst main.", "questions": ["how to stop a burst"]},
            {"chunk_id": "c2", "text": "Hydrants are inspected yearly.", "questions": ["when are hydrants checked"]}]
    rows[1].update(change)
    path.write_text(json.dumps(rows))
    return path


# ---------------------------------------------------------------------------------------------------------- datasets


def test_convert_force_with_a_lone_surrogate_leaves_the_old_dataset_whole(tmp_path):
    """Reproduction 1: the corpus was replaced before the queries failed to encode; now nothing is written."""
    out = write_dataset(tmp_path / "ds", {"train": list(QUESTIONS)})
    (out / "README.md").write_text("the team's notes\n")
    before = tree(out)
    src = tmp_path / "src.json"
    src.write_text(json.dumps([{"chunk_id": "c", "text": "t", "questions": ["x"]}])[:-3] + ', "what is \\ud83d?"]}]')
    r = CliRunner().invoke(main, ["convert", str(src), "--out", str(out), "--force"])
    assert r.exit_code == 1 and "lone surrogate" in r.output and r.output.count("\n") == 1, r.output
    assert tree(out) == before
    assert load_dataset(out).corpus  # still loads
    fresh = tmp_path / "fresh"
    r = CliRunner().invoke(main, ["convert", str(src), "--out", str(fresh)])
    assert r.exit_code == 1 and not fresh.exists()  # no partial corpus.jsonl to refuse a good rerun


def test_convert_force_replaces_the_dataset_as_a_unit_and_keeps_other_files(tmp_path):
    out = write_dataset(tmp_path / "ds", {"train": list(QUESTIONS), "test": list(QUESTIONS)})
    (out / "README.md").write_text("notes\n")
    (out / "split.json").write_text("{}")
    ds, _ = convert(chunks_source(tmp_path / "src.json"), out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "corpus.jsonl", "qrels", "queries.jsonl"]
    assert sorted(p.name for p in (out / "qrels").iterdir()) == ["all.tsv"]  # the old splits went with the old data
    assert load_dataset(out).corpus == ds.corpus and not list(tmp_path.glob(".ds.*"))


@pytest.mark.parametrize("cid, words", [("a\tb", "control character"), ("a\nb", "control character"),
                                        ('"a', "starts with a quote"), (" a ", "surrounding spaces"),
                                        ("", "empty chunk id")])
def test_ids_the_qrels_tsv_cannot_carry_are_refused_before_writing(cid, words, tmp_path):
    """Reproduction 5: convert wrote ids its own loader read back differently (or not at all)."""
    with pytest.raises(AdapterError, match=words):
        convert(chunks_source(tmp_path / "src.json", chunk_id=cid), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_id_convert_accepts_reads_back_the_same(tmp_path):
    ds, _ = convert(chunks_source(tmp_path / "src.json", chunk_id="a b,c'é"), tmp_path / "out")
    back = load_dataset(tmp_path / "out")
    assert back.corpus == ds.corpus and back.qrels["all"] == ds.qrels["all"]


@pytest.mark.parametrize("name, data, where", [
    ("p.jsonl", '{"question": "q", "chunk": "caf\xe9"}\n'.encode("latin-1"), "p.jsonl:1: not UTF-8"),
    ("p.jsonl", '{"question": "q", "chunk": "t"}\n'.encode("utf-16"), "looks like UTF-16"),
    ("p.csv", "question,chunk\nq,ok\nq2,caf\xe9\n".encode("latin-1"), "p.csv:3: not UTF-8"),
])
def test_bytes_that_are_not_utf8_are_named_with_file_and_line(name, data, where, tmp_path):
    """Reproduction 6."""
    (tmp_path / name).write_bytes(data)
    with pytest.raises(AdapterError, match=where):
        convert(tmp_path / name, tmp_path / "out", fmt="pairs")


def test_not_utf8_inside_a_dataset_names_the_file_and_line(tmp_path):
    ds = write_dataset(tmp_path / "ds")
    (ds / "qrels" / "all.tsv").write_bytes((ds / "qrels" / "all.tsv").read_bytes() + "q_lead\tlead\t1\xe9\n"
                                           .encode("latin-1"))
    with pytest.raises(AdapterError, match=r"all.tsv:10: not UTF-8"):
        load_dataset(ds)


def test_cells_over_the_csv_modules_limit_are_read(tmp_path):
    """Reproduction 8: a cell or a qrels field over 131,072 characters was a `_csv.Error`."""
    long = "pump " * 30_000
    (tmp_path / "p.csv").write_text(f"question,chunk\nwhat pumps,{long}\n")
    ds, _ = convert(tmp_path / "p.csv", tmp_path / "out")
    assert list(ds.corpus.values()) == [long]
    qrels = tmp_path / "out" / "qrels" / "all.tsv"
    qrels.write_text(qrels.read_text() + "q0\t" + "c" * 140_000 + "\t1\n")
    with pytest.raises(AdapterError, match=r"all.tsv:3: unknown corpus id 'ccc"):
        load_dataset(tmp_path / "out")


def test_unterminated_csv_quote_is_named_as_such(tmp_path):
    (tmp_path / "p.csv").write_text('question,chunk\nwhat,"it goes on\nand on\n')
    with pytest.raises(AdapterError, match=r"p.csv:2: malformed row .*unterminated quote"):
        convert(tmp_path / "p.csv", tmp_path / "out")


@pytest.mark.parametrize("score", ["0.5", "inf", "nan", "1e400"])
def test_a_qrels_score_that_is_not_a_whole_number_is_refused(score, tmp_path):
    """Reproduction 13: 0.5 was silently read as 0, not relevant."""
    ds = write_dataset(tmp_path / "ds")
    (ds / "qrels" / "all.tsv").write_text(f"query-id\tcorpus-id\tscore\nq_burst\tburst\t{score}\n")
    with pytest.raises(AdapterError, match=r"all.tsv:2: score"):
        load_dataset(ds)


@pytest.mark.parametrize("text, words", [("7", "is a number"), ("NaN", "is NaN"), ('["a"]', "is a list"),
                                         ("null", "is null"), ('"  "', "empty text")])
def test_texts_that_are_not_strings_are_called_what_they_are(text, words, tmp_path):
    """Reproduction 14: NaN, numbers and lists were all called "empty text"."""
    ds = write_dataset(tmp_path / "ds")
    with open(ds / "corpus.jsonl", "a") as f:
        f.write(f'{{"_id": "n", "text": {text}}}\n')
    with pytest.raises(AdapterError, match=f"corpus.jsonl:7: .*{words}"):
        load_dataset(ds)


def test_a_lone_surrogate_in_a_dataset_is_refused_on_load(tmp_path):
    """Reproduction 1, second half: the same text crashed `embed` (the cache key could not be encoded)."""
    ds = write_dataset(tmp_path / "ds")
    with open(ds / "corpus.jsonl", "a") as f:
        f.write('{"_id": "s", "text": "pump \\ud83d"}\n')
    with pytest.raises(AdapterError, match=r"corpus.jsonl:7: .*lone surrogate"):
        load_dataset(ds)


def test_a_lone_surrogate_given_to_the_encoder_is_one_line_naming_its_place(tiny_model_dir, tmp_path):
    """The same text passed straight to ``Encoder.encode`` in Python: UnicodeEncodeError while hashing the cache key."""
    from adapter.encoder import Encoder

    encoder = Encoder(str(tiny_model_dir), cache_dir=tmp_path / "cache", show_progress=False)
    with pytest.raises(AdapterError, match=r"^query texts\[1\] \(of 2\) holds a lone surrogate '\\ud83d' at "
                                           r"character 8") as e:
        encoder.encode_queries(["pump", "what is \ud83d?"])
    assert "\n" not in str(e.value)
    with pytest.raises(AdapterError, match=r"^document texts\[0\] \(of 1\) is NoneType, not a string"):
        encoder.encode_documents([None])
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.npz"))  # nothing embedded


def test_a_local_model_stores_each_part_as_it_finishes(tiny_model_dir, tmp_path, monkeypatch):
    """A local model's vectors go to the cache a part (``PART_BATCHES`` batches) at a time, so a run that dies
    mid-way (killed, or the model failing) keeps every finished part and the rerun embeds only the rest."""
    import adapter.backends
    from adapter.encoder import Encoder

    monkeypatch.setattr(adapter.backends, "PART_BATCHES", 2)  # parts of 2 x 4 texts
    texts = [f"pump station {i} alarm" for i in range(20)]
    encoder = Encoder(str(tiny_model_dir), cache_dir=tmp_path / "cache", batch_size=4, show_progress=False)
    real, calls = encoder.model.encode_document, []

    def dies_in_the_second_part(chunk, **kw):
        calls.append(len(chunk))
        if len(calls) == 4:  # a batch at a time (the progress bar moves after each): the second part's second batch
            raise KeyboardInterrupt  # as a kill would
        return real(chunk, **kw)

    monkeypatch.setattr(encoder.model, "encode_document", dies_in_the_second_part)
    with pytest.raises(KeyboardInterrupt):
        encoder.encode_documents(texts)
    assert calls == [4, 4, 4, 4] and encoder.texts_encoded == 8  # the first part kept, half of the second lost
    again = Encoder(str(tiny_model_dir), cache_dir=tmp_path / "cache", batch_size=4, show_progress=False)
    vectors = again.encode_documents(texts)
    assert again.texts_encoded == 12  # only the parts that never finished
    fresh = Encoder(str(tiny_model_dir), cache_dir=tmp_path / "fresh", batch_size=4, show_progress=False)
    np.testing.assert_allclose(vectors, fresh.encode_documents(texts), atol=1e-6)


def test_split_writes_its_files_as_one_unit(tmp_path, monkeypatch):
    """A failure (or a kill) while writing the splits: before, train.tsv of the new seed could sit beside test.tsv of
    the old one (test questions leaking into training). Now the old splits and split.json stay whole."""
    import adapter.data
    from adapter.data import split_dataset

    ds = split_tiny(tmp_path / "ds")
    before = tree(ds)
    real = adapter.data.atomic_write

    def dies_on_test_split(path, mode="w"):
        if Path(path).name == "test.tsv":
            raise KeyboardInterrupt  # as a kill would, halfway through
        return real(path, mode)

    monkeypatch.setattr(adapter.data, "atomic_write", dies_on_test_split)
    with pytest.raises(KeyboardInterrupt):
        split_dataset(ds, by="query", test_fraction=0.3, seed=1, force=True)
    assert tree(ds) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary left
    monkeypatch.undo()
    split_dataset(ds, by="query", test_fraction=0.3, seed=1, force=True)
    assert json.loads((ds / "split.json").read_text())["seed"] == 1 and tree(ds) != before


@pytest.mark.parametrize("fmt", ["pairs", "chunks", "llamaindex"])
def test_a_folder_given_as_a_file_format(fmt, tmp_path):
    """Reproduction 12: IsADirectoryError."""
    with pytest.raises(AdapterError, match="is a folder"):
        convert(tmp_path, tmp_path / "out", fmt=fmt)


def test_save_dataset_refuses_the_current_folder(tmp_path, monkeypatch):
    ds = load_dataset(write_dataset(tmp_path / "ds"))
    monkeypatch.chdir(tmp_path / "ds")
    with pytest.raises(AdapterError, match="current folder"):
        save_dataset(ds, ".", force=True)


# ---------------------------------------------------------------------------------------------------------- property

SAFE = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LINE = st.one_of(st.binary(max_size=60), st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
                 st.sampled_from([b'{"_id": "x", "text": NaN}', b'{"_id": 1.5, "text": "t"}', b'{"_id": "x"}',
                                  b'{"_id": "\\ud83d", "text": "t"}', b'{"_id": " x", "text": "t"}', b"[1]",
                                  b"q_burst\tburst\t0.5", b"q_burst\tburst", b'"q_burst\tburst\t1', b"\xff\xfe",
                                  b'{"_id": "burst", "text": "dup"}', b"{" * 5000]))


@SAFE
@given(target=st.sampled_from(["corpus.jsonl", "queries.jsonl", "qrels/all.tsv"]), lines=st.lists(LINE, max_size=4),
       keep=st.booleans())
def test_any_damaged_dataset_file_is_a_one_line_error(tmp_path_factory, target, lines, keep):
    """Whatever bytes land in a dataset file, loading it either works or raises AdapterError (never another
    exception), and a failed convert of it leaves an existing output byte-identical."""
    tmp = tmp_path_factory.mktemp("prop")
    ds = write_dataset(tmp / "ds")
    path = ds / target
    path.write_bytes((path.read_bytes() if keep else b"") + b"\n".join(lines))
    out = write_dataset(tmp / "out")
    before = tree(out)
    try:
        load_dataset(ds)
    except AdapterError as e:
        assert "\n" not in str(e).strip()
        with pytest.raises(AdapterError):
            convert(ds, out, force=True)
        assert tree(out) == before


# ---------------------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("argv, words", [
    (["train", "{ds}", "--out", "{out}", "--set", "train.lr=nan"], "train.lr takes a finite number"),
    (["train", "{ds}", "--out", "{out}", "--set", "train.lr=inf"], "finite"),
    (["train", "{ds}", "--out", "{out}", "--set", "train.temperature=0"], "> 0"),
    (["train", "{ds}", "--out", "{out}", "--set", "train.margin=nan"], "finite"),
    (["train", "{ds}", "--out", "{out}", "--set", "train.identity_penalty=-1"], ">= 0"),
    (["train", "{ds}", "--out", "{out}", "--set", "train.identity_penalty=nan"], "finite"),
    (["train", "{ds}", "--out", "{out}", "--seed", "-1"], ">= 0"),
    (["split", "{ds}", "--seed", "-1"], ">= 0"),
    (["finetune", "{ds}", "--out", "{out}", "--set", "finetune.lr=nan"], "finite"),
    (["finetune", "{ds}", "--out", "{out}", "--seed", "-3"], ">= 0"),
    (["compare", "{ds}", "--out", "{out}", "--set", "report.bootstrap_samples=0"], ">= 1"),
    (["compare", "{ds}", "--out", "{out}", "--set", "report.bootstrap_samples=-1"], ">= 1"),
    (["generate", "{ds}", "--set", "llm.request_timeout=inf"], "finite"),
    (["search", "pump", "--store", "faiss:{ds}/x.faiss", "--adapter", "a.safetensors", "-k", "0"], ">= 1"),
])
def test_numeric_options_are_checked_before_anything_loads(argv, words, tmp_path, monkeypatch):
    """Reproductions 12 and 13: NaN, infinities, zeros and negatives ran (or crashed) after the model was loaded."""
    import adapter.encoder

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(adapter.encoder, "load_model", no_model)
    ds = write_dataset(tmp_path / "ds", {"train": list(QUESTIONS), "test": list(QUESTIONS)})
    r = CliRunner().invoke(main, [a.format(ds=ds, out=tmp_path / "out") for a in argv])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_writers_refuse_an_existing_output_before_loading_a_model(tmp_path, monkeypatch):
    """Reproduction 4: `index build --out EXISTING` replaced it; `evaluate --json EXISTING` too. A reranker is a
    model too: compare loaded it before looking at --out."""
    import adapter.encoder
    import adapter.rerank

    monkeypatch.setattr(adapter.encoder, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(adapter.rerank, "_cross_encoder", lambda *a, **k: pytest.fail("reranker loaded"))
    ds = write_dataset(tmp_path / "ds", {"test": list(QUESTIONS)})
    taken = tmp_path / "taken"
    taken.write_text("mine")
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("mine")
    reranker = tmp_path / "reranker"  # passes the folder check; loading it is what must not happen
    reranker.mkdir()
    (reranker / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    rerank = ["--reranker", str(reranker), "--set", "rerank.k=2"]
    for argv in (["index", "build", str(ds), "--out", str(taken)], ["evaluate", str(ds), "--json", str(taken)],
                 ["compare", str(ds), "--out", str(report)], ["evaluate", str(ds), "--json", str(taken), *rerank],
                 ["compare", str(ds), "--out", str(report), *rerank]):
        r = CliRunner().invoke(main, argv)
        assert r.exit_code == 1 and "pass --force" in r.output, r.output
    assert taken.read_text() == "mine" and (report / "report.md").read_text() == "mine"


def test_train_reports_a_base_that_scores_zero_instead_of_dividing_by_it():
    """Reproduction 3: ZeroDivisionError after the adapter file was written, exit 1."""
    from adapter.cards import pct_change
    from cli import NO_CHANGE

    assert pct_change(0.25, 0.0, zero=NO_CHANGE) == "base scored 0: no relative change"
    assert pct_change(0.5, 0.25, zero=NO_CHANGE) == "+100.0%"


def test_an_empty_query_is_refused(tmp_path):
    r = CliRunner().invoke(main, ["search", "  ", "--store", "faiss:" + str(tmp_path / "i.faiss"), "--adapter",
                                  str(tmp_path / "a.safetensors")])
    assert r.exit_code == 1 and "the query is empty" in r.output


def test_an_all_zeros_adapter_is_refused(tmp_path):
    import numpy as np

    from adapter.model import LinearAdapter

    path = LinearAdapter(4, "m@x", weight=np.zeros((4, 4), np.float32)).save(tmp_path / "z.safetensors")
    with pytest.raises(AdapterError, match="all zeros"):
        LinearAdapter.load(path)
    # low-rank too (the fuzz table's all-zeros file is made from whatever form training shipped)
    path = LinearAdapter(4, "m@x", U=np.zeros((4, 2), np.float32), V=np.zeros((2, 4), np.float32)).save(
        tmp_path / "z2.safetensors")
    with pytest.raises(AdapterError, match="all zeros"):
        LinearAdapter.load(path)
    trained = LinearAdapter(4, "m@x", U=np.ones((4, 2), np.float32), V=np.zeros((2, 4), np.float32)).save(
        tmp_path / "ok.safetensors")
    assert LinearAdapter.load(trained).dim == 4  # V still zero after training is fine: the identity, as trained


@pytest.mark.parametrize("out", [".", ".."])
def test_export_refuses_the_current_folder_and_its_parents(out, tmp_path, monkeypatch):
    """Reproduction 12: `export --force --out ..` tried to move the folder the user stands in."""
    from adapter.export import export

    here = tmp_path / "a" / "here"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    with pytest.raises(AdapterError, match="current folder"):
        export(tmp_path / "none.safetensors", out, force=True)
    assert here.is_dir()


# ---------------------------------------------------------------------------------------------------------- secrets


def test_redact_masks_keys_tokens_and_known_secrets(monkeypatch):
    from adapter.errors import redact

    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-1234567890")
    text = redact("401: key sk-abcdefghijklmnop rejected; Authorization: Bearer eyJhbGciOi.J9 tok-1234567890 "
                  '{"api_key": "plainsecret"} mine', secrets=["mine-not"])
    for secret in ("sk-abcdefghijklmnop", "eyJhbGciOi.J9", "tok-1234567890", "plainsecret"):
        assert secret not in text
    assert text.startswith("401: key sk-*** rejected") and text.endswith("mine")


class _EchoKey401:
    """A loopback server that answers every request with a 401 whose body echoes the key it was sent."""

    def __enter__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.dumps({"error": {"message": f"Incorrect API key provided: "
                                             f"{self.headers.get('Authorization', '')[7:]}", "type": "auth"}})
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_a_key_echoed_by_the_server_never_reaches_the_terminal(tmp_path, capfd):
    """Reproduction 10."""
    ds = write_dataset(tmp_path / "ds")
    key = "sk-live-0123456789abcdefXYZ"
    with _EchoKey401() as url:
        r = CliRunner().invoke(main, ["generate", str(ds), "--base-url", url, "--set",
                                      "llm.api_key_env=ADAPTER_TEST_KEY"],
                               env={"ADAPTER_TEST_KEY": key})
    captured = capfd.readouterr()
    assert r.exit_code == 1 and "HTTP 401" in r.output, r.output
    assert key not in r.output + captured.err + captured.out and "***" in r.output


def test_a_dead_endpoint_fails_at_once_with_one_line(tmp_path, monkeypatch):
    """Reproduction 9: connection refused was retried per chunk (169 s for 25 chunks); a bad URL was a vague error."""
    import socket

    import adapter.resilience

    monkeypatch.setattr(adapter.resilience, "backoff_delay", lambda *a, **k: pytest.fail("a refused call was retried"))
    ds = write_dataset(tmp_path / "ds")
    with socket.socket() as s:  # bound, never listening: connections are refused, and no one else can take the port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        r = CliRunner().invoke(main, ["-q", "generate", str(ds), "--base-url", f"http://127.0.0.1:{port}/v1"])
    assert r.exit_code == 1 and "cannot connect" in r.output and r.output.count("\n") == 1, r.output
    r = CliRunner().invoke(main, ["generate", str(ds), "--base-url", "not a url"])
    assert r.exit_code == 1 and "not an http(s) URL" in r.output and r.output.count("\n") == 1, r.output


# ---------------------------------------------------------------------------------------------------------- the cache

# Reproductions 2 and 7 (concurrent runs, kill -9, damaged shards) are tests of the cache itself: tests/test_cache.py.


# ---------------------------------------------------------------------------------------------------------- chunking


def test_the_default_chunk_size_is_what_the_model_reads(tmp_path, caplog):
    """Reproduction 11: 800-token chunks were cut to MiniLM's 256 without a word."""
    from adapter.chunking import model_max_tokens

    limit = model_max_tokens("sentence-transformers/all-MiniLM-L6-v2")
    assert limit == 256
    (tmp_path / "doc.md").write_text("The pumping station has two pumps and a standby generator. " * 400)
    r = CliRunner().invoke(main, ["chunk", str(tmp_path / "doc.md"), "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    settings = json.loads((tmp_path / "a" / "chunk.json").read_text())
    assert (settings["size"], settings["overlap"]) == (256, 128) and "(256 tokens, overlap 128)" in r.output
    with caplog.at_level("WARNING"):
        r = CliRunner().invoke(main, ["chunk", str(tmp_path / "doc.md"), "--out", str(tmp_path / "b"), "--size", "800"])
    assert r.exit_code == 0 and "longer than the 256 tokens" in caplog.text


# ---------------------------------------------------------------------------------------------------------- the table


def _before_any_model(case) -> bool:
    """Cases that must fail before a model loads (so the table test stays quick): every option check, and the
    commands that read files only."""
    return case.command in ("convert", "split", "chunk", "generate") or case.what.startswith("--") or \
        case.what in ("empty query", "blank query", "--out exists", "--out holds a report")


def test_fault_table_every_command_fails_cleanly(tmp_path_factory, tiny_model_dir):
    """The table of tests/fault_cases.py (the quick part; bench/bench_faults.py runs all of it): each case exits
    non-zero with at most 3 lines on stderr, no traceback, no file changed and none left behind."""
    from tests.fault_cases import build_workspace, cases, run_case

    root = tmp_path_factory.mktemp("faults")
    w = build_workspace(root / "ws", str(tiny_model_dir), root / "cache", light=True)
    selected = [c for c in cases() if _before_any_model(c)]
    assert len(selected) > 60
    bad = [o for o in (run_case(c, w, root / "cache") for c in selected) if not o.clean]
    assert not bad, "\n".join(f"{o.case.command}: {o.case.what}: exit {o.code}, traceback {o.traceback}, "
                              f"{o.lines} lines, left {o.left[:2]}, changed {o.changed[:2]}: {o.stderr[-300:]}"
                              for o in bad)


# ---------------------------------------------------------------------------------------------------------- audit #24

BOMB = 2_500_000_000  # bytes each crafted FAISS file claims, in a file of a few kilobytes


def _faiss_bomb(kind: str, path: Path) -> Path:
    """A small valid FAISS file of ``kind`` with one array's declared length raised to claim ``BOMB`` bytes, the
    file cut short after it: what faiss allocates before it reads."""
    import struct

    import faiss

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    if kind == "flat":  # the audit's 61-byte file
        index = faiss.IndexFlatIP(384)
        index.add(np.eye(384, dtype=np.float32)[:1])
        raw = bytearray(faiss.serialize_index(index).tobytes())
        raw[8:16] = struct.pack("<q", BOMB // 4 // 384)
        raw[37:45] = struct.pack("<Q", BOMB // 4)
        path.write_bytes(bytes(raw[:61]))
        return path
    if kind == "ids":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(16))
        index.add_with_ids(x, np.arange(400))
        raw = bytearray(faiss.serialize_index(index).tobytes())
        at = len(raw) - 8 * 400 - 8
        raw[at:at + 8] = struct.pack("<Q", BOMB // 8)
    elif kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, 4, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.add(x)
        raw = bytearray(faiss.serialize_index(index).tobytes())
        at = raw.index(b"ilar") + 4 + 16 + 4 + 8  # nlist, code_size, "full", count: the first list's size
        raw[at:at + 8] = struct.pack("<Q", BOMB // (64 + 8))
    else:  # hnsw: its neighbour table
        index = faiss.IndexHNSWFlat(16, 8, faiss.METRIC_INNER_PRODUCT)
        index.add(x)
        raw = bytearray(faiss.serialize_index(index).tobytes())
        at = 37
        for item in (8, 4, 4, 8):  # level probabilities, neighbours per level, levels, offsets
            at += 8 + item * struct.unpack_from("<Q", raw, at)[0]
        raw[at:at + 8] = struct.pack("<Q", BOMB // 4)
    path.write_bytes(bytes(raw[:at + 64]))
    return path


@pytest.mark.parametrize("kind", ["flat", "ids", "ivf", "hnsw"])
def test_a_faiss_file_claiming_gigabytes_is_refused_before_they_are_allocated(kind, tmp_path):
    """Audit #24.4: a 61-byte FAISS file claiming 2.5 GB of vectors took `search` to 2.6 GiB before it failed:
    FAISS allocates each array's declared length before reading it. The file's layout is now checked against its
    size first (in a fresh process, so its peak memory is the read's own)."""
    import subprocess
    import sys

    import faiss

    path = _faiss_bomb(kind, tmp_path / f"{kind}.faiss")
    small = tmp_path / "small.faiss"
    faiss.write_index(faiss.IndexFlatIP(16), str(small))
    probe = ("import resource, sys\nfrom adapter.errors import AdapterError\nfrom adapter.stores import read_index\n"
             "try:\n    read_index(sys.argv[1])\n    print('read it')\nexcept AdapterError as e:\n    print(e)\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")

    def read(file: Path) -> tuple[str, int]:  # what reading it said, and the process's peak memory
        r = subprocess.run([sys.executable, "-c", probe, str(file)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        message, peak = r.stdout.strip().splitlines()[-2:]
        return message, int(peak)

    (fine, baseline), (message, peak) = read(small), read(path)
    assert fine == "read it"
    assert "not a readable FAISS index" in message and f"holds {path.stat().st_size:,} bytes" in message, message
    assert peak < baseline + (64 << 20), f"{peak >> 20} MiB to refuse a {path.stat().st_size}-byte file, " \
                                         f"{baseline >> 20} MiB to read an empty index"


def test_evaluate_names_a_damaged_cache_shard_instead_of_scoring_its_vectors(tmp_path, tiny_model_dir):
    """Audit #24.6: with damaged vectors in a cache shard `evaluate` exited 0 and scored them (base ndcg@10 0.60 ->
    0.11). Now it stops in one line naming the shard to delete; deleting it, the run embeds again and scores as
    before."""
    from adapter.cache import HEADER_BYTES

    ds = write_dataset(tmp_path / "ds", {"test": list(QUESTIONS)})
    argv = ["-q", "evaluate", str(ds), "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache")]
    first = CliRunner().invoke(main, argv)
    assert first.exit_code == 0, first.output
    shards = sorted((tmp_path / "cache").rglob("*.shard"), key=lambda p: p.stat().st_size)
    shard = shards[-1]  # the corpus's (or the queries'): either is read by evaluate
    raw = bytearray(shard.read_bytes())
    rows = json.loads(raw[:HEADER_BYTES])["rows"]
    at = HEADER_BYTES + 16 * rows
    raw[at:at + 64] = bytes(64)  # the first row's first 16 numbers zeroed
    shard.write_bytes(bytes(raw))
    scores = lambda out: [line for line in out.splitlines() if "it/s" not in line and line.strip()]  # noqa: E731
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 1 and scores(r.output)[-1].startswith("Error: "), r.output
    assert f"{shard.name}: damaged embedding cache shard" in r.output and "delete it" in r.output
    shard.unlink()
    again = CliRunner().invoke(main, argv)
    metrics = lambda out: [line for line in scores(out) if "@" in line]  # noqa: E731
    assert again.exit_code == 0 and metrics(again.output) == metrics(first.output) != []


def _no_model(monkeypatch) -> None:
    import adapter.encoder

    monkeypatch.setattr(adapter.encoder, "load_model", lambda *a, **k: pytest.fail("a model was loaded first"))


def test_train_json_is_checked_before_any_work(tmp_path, monkeypatch):
    """Audit #24.7: `train --json FILE` replaced an existing file without --force, and into a missing folder it
    failed after the adapter was written. Both are refused before a model loads; nothing is written."""
    _no_model(monkeypatch)
    ds = write_dataset(tmp_path / "ds", {"train": list(QUESTIONS)})
    taken = tmp_path / "taken.json"
    taken.write_text("mine")
    out = tmp_path / "a.safetensors"
    for json_out, words in ((taken, "pass --force"), (tmp_path / "nowhere" / "t.json", "folder does not exist"),
                            (out, "same file")):
        r = CliRunner().invoke(main, ["train", str(ds), "--out", str(out), "--json", str(json_out)])
        assert r.exit_code == 1 and words in r.output and r.output.count("\n") == 1, r.output
    assert taken.read_text() == "mine" and not out.exists()


def test_compare_refuses_any_file_it_would_replace_before_any_work(tmp_path, monkeypatch):
    """Audit #24.7: `compare --out DIR` on a folder holding results.json, summary.json and report.html but no
    report.md replaced them silently."""
    _no_model(monkeypatch)
    ds = write_dataset(tmp_path / "ds", {"test": list(QUESTIONS)})
    out = tmp_path / "cmp"
    out.mkdir()
    for name in ("results.json", "summary.json", "report.html"):
        (out / name).write_text("mine")
    r = CliRunner().invoke(main, ["compare", str(ds), "--out", str(out)])
    assert r.exit_code == 1 and "report.html: already exists; pass --force" in r.output, r.output
    assert all((out / n).read_text() == "mine" for n in ("results.json", "summary.json", "report.html"))


@pytest.mark.parametrize("rag", [{"k": 3, "systems": {"base": {"accuracy": 0.5}}},
                                 {"k": 3, "compared": 2, "questions": 2, "llm_model": "m", "judge_model": "m",
                                  "systems": {"base": {"accuracy": 0.5, "ndcg@10": 0.5, "gold_in_context": 1,
                                                       "ungraded": 0, "accuracy_ci": [0.1], "change": None}}},
                                 "[" * 100_000], ids=["keys", "interval", "nested"])
def test_compare_rag_json_missing_keys_is_one_line_before_any_work(rag, tmp_path, monkeypatch):
    """Audit #24.8: `compare --rag` with a rag.json missing keys ended in a KeyError after all the scoring."""
    _no_model(monkeypatch)
    ds = write_dataset(tmp_path / "ds", {"test": list(QUESTIONS)})
    path = tmp_path / "rag.json"
    path.write_text(rag if isinstance(rag, str) else json.dumps(rag))
    r = CliRunner().invoke(main, ["compare", str(ds), "--out", str(tmp_path / "cmp"), "--rag", str(path)])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "rag" in r.output, r.output
    assert not (tmp_path / "cmp").exists()


@pytest.fixture(scope="module")
def trained_tiny(tiny_model_dir, tmp_path_factory):
    """A dataset, and an adapter trained on it for the tiny model (2 epochs), with their own cache."""
    root = tmp_path_factory.mktemp("trained")
    ds = write_dataset(root / "ds", {"train": list(QUESTIONS), "test": list(QUESTIONS)})
    r = CliRunner().invoke(main, ["-q", "train", str(ds), "--out", str(root / "a.safetensors"), "--model",
                                  str(tiny_model_dir), "--set", "train.epochs=2", "--cache-dir", str(root / "cache")])
    assert r.exit_code == 0, r.output
    return ds, root / "a.safetensors", root / "cache"


def test_compare_at_dims_without_the_full_one_writes_its_report(trained_tiny, tiny_model_dir, tmp_path):
    """Audit #24.8: `compare --dims 128,64` (no full dimension: ordinary use) ended in KeyError: 384 after all the
    scoring and left an empty folder."""
    ds, adapter, cache = trained_tiny
    out = tmp_path / "cmp"
    r = CliRunner().invoke(main, ["-q", "compare", str(ds), "--out", str(out), "--base-model", str(tiny_model_dir),
                                  "--adapter", str(adapter), "--dims", "16,8", "--cache-dir", str(cache)])
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["base"]) == ["16", "8"] and (out / "report.md").is_file()


def _full_disk(monkeypatch, where: str) -> None:
    """os.replace in adapter.data (the write-beside-then-rename path) fails as a full disk does, for targets
    under ``where``."""
    import errno

    import adapter.data

    real = adapter.data.os.replace

    def replace(src, dst, *a, **k):
        if str(dst).startswith(where):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(adapter.data.os, "replace", replace)


def test_a_full_disk_on_train_and_compare_out_is_one_line_and_writes_nothing(trained_tiny, tiny_model_dir, tmp_path,
                                                                             monkeypatch):
    """Audit #24.8: ENOSPC on `train --out` and `compare --out` was a traceback. Now one line, nothing half
    written: the old report stays whole, a new folder is not left behind."""
    ds, _, cache = trained_tiny
    common = ["--cache-dir", str(cache)]
    out = tmp_path / "cmp"
    first = CliRunner().invoke(main, ["-q", "compare", str(ds), "--out", str(out), "--base-model",
                                      str(tiny_model_dir), *common])
    assert first.exit_code == 0, first.output
    before = tree(out)
    _full_disk(monkeypatch, str(tmp_path))
    for argv, target in ((["compare", str(ds), "--out", str(out), "--base-model", str(tiny_model_dir), "--force"],
                          out),
                         (["compare", str(ds), "--out", str(tmp_path / "new"), "--base-model", str(tiny_model_dir)],
                          tmp_path / "new"),
                         (["train", str(ds), "--out", str(tmp_path / "a.safetensors"), "--model",
                           str(tiny_model_dir), "--set", "train.epochs=1"], tmp_path / "a.safetensors")):
        r = CliRunner().invoke(main, ["-q", *argv, *common])
        assert r.exit_code == 1 and "No space left on device" in r.output, r.output
        assert r.output.strip().splitlines()[-1].startswith("Error: ") and "Traceback" not in r.output
        assert target == out or not target.exists()
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp"]  # no temporary left beside
