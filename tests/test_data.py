import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapter.data import convert, detect_format, fingerprint, load_dataset, split_dataset
from adapter.errors import AdapterError
from cli import main
from tests.conftest import APPLEQA, CHUNKS, QUESTIONS, write_dataset


def expected_pairs() -> set[tuple[str, str]]:
    """(question text, chunk text) pairs of the tiny dataset: what every converter must preserve."""
    return {(q, CHUNKS[c]) for q, cs in QUESTIONS.values() for c in cs}


def pairs_of(folder: Path) -> set[tuple[str, str]]:
    ds = load_dataset(folder)
    return {(ds.queries[q], ds.corpus[c]) for q, rels in ds.qrels["all"].items() for c in rels}


def make_source(fmt: str, tmp: Path) -> Path:
    """Write the tiny dataset in one source format."""
    if fmt == "chunks-dict":
        items = [{"chunk_index": i, "input_chunk": text,
                  "questions": {f"question_{j}": q for j, (q, cs) in enumerate(QUESTIONS.values()) if cid in cs}}
                 for i, (cid, text) in enumerate(CHUNKS.items())]
        path = tmp / "chunks.json"
        path.write_text(json.dumps(items))
    elif fmt == "chunks-list":
        items = [{"chunk": text, "questions": [q for q, cs in QUESTIONS.values() if cid in cs]}
                 for cid, text in CHUNKS.items()]
        path = tmp / "chunks.json"
        path.write_text(json.dumps(items))
    elif fmt == "llamaindex":
        path = tmp / "li.json"
        path.write_text(json.dumps({"queries": {q: t for q, (t, _) in QUESTIONS.items()}, "corpus": CHUNKS,
                                    "relevant_docs": {q: cs for q, (_, cs) in QUESTIONS.items()}, "mode": "text"}))
    elif fmt in ("pairs-csv", "pairs-csv-noid"):
        path = tmp / "pairs.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["anchor", "positive", "global_chunk_id"] if fmt == "pairs-csv" else ["question", "text"])
            for q, cs in QUESTIONS.values():
                for c in cs:
                    w.writerow([q, CHUNKS[c], c] if fmt == "pairs-csv" else [q, CHUNKS[c]])
    elif fmt == "pairs-jsonl":
        path = tmp / "pairs.jsonl"
        path.write_text("".join(json.dumps({"question": q, "text": CHUNKS[c]}) + "\n"
                                for q, cs in QUESTIONS.values() for c in cs))
    else:
        path = write_dataset(tmp / "beir", {"train": list(QUESTIONS)[:4], "test": list(QUESTIONS)[4:]})
        (path / "qrels" / "all.tsv").unlink()
    return path


@pytest.mark.parametrize("fmt, detected", [
    ("chunks-dict", "chunks"), ("chunks-list", "chunks"), ("llamaindex", "llamaindex"), ("pairs-csv", "pairs"),
    ("pairs-csv-noid", "pairs"), ("pairs-jsonl", "pairs"), ("beir", "beir")])
def test_convert_round_trip(fmt, detected, tmp_path):
    src = make_source(fmt, tmp_path)
    assert detect_format(src) == detected
    ds, used = convert(src, tmp_path / "out")
    assert used == detected
    assert pairs_of(tmp_path / "out") == expected_pairs()
    assert len(ds.corpus) == len(CHUNKS)  # a chunk repeated over rows is one corpus entry
    assert len(ds.queries) == len(QUESTIONS)  # a question asked of two chunks is one query with two relevant
    # converting the result again (BEIR) changes nothing
    convert(tmp_path / "out", tmp_path / "again")
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/all.tsv"):
        assert (tmp_path / "out" / name).read_text() == (tmp_path / "again" / name).read_text()


def test_convert_cli_says_detected_format(tmp_path):
    src = make_source("llamaindex", tmp_path)
    r = CliRunner().invoke(main, ["convert", str(src), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "detected: llamaindex" in r.output
    r = CliRunner().invoke(main, ["convert", str(src), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "already holds a dataset" in r.output
    r = CliRunner().invoke(main, ["convert", str(src), "--out", str(tmp_path / "o"), "--force"])
    assert r.exit_code == 0


def corrupt(tmp: Path, case: str) -> tuple[Path, str]:
    """A dataset folder broken in one way, and the words the error must contain."""
    ds = write_dataset(tmp / "bad")
    corpus, queries, qrels = ds / "corpus.jsonl", ds / "queries.jsonl", ds / "qrels" / "all.tsv"
    lines = corpus.read_text().splitlines()
    if case == "malformed-json":
        corpus.write_text("\n".join([lines[0], '{"_id": "x", "text": ', *lines[1:]]) + "\n")
        return ds, "corpus.jsonl:2: malformed JSON"
    if case == "missing-id":
        corpus.write_text("\n".join([*lines, '{"text": "no id"}']) + "\n")
        return ds, f"corpus.jsonl:{len(lines) + 1}: missing '_id'"
    if case == "duplicate-id":
        corpus.write_text("\n".join([*lines, lines[0]]) + "\n")
        return ds, f"corpus.jsonl:{len(lines) + 1}: duplicate id 'burst' (first on line 1)"
    if case == "empty-text":
        queries.write_text(queries.read_text() + '{"_id": "q_empty", "text": "  "}\n')
        return ds, "queries.jsonl:8: empty text for id 'q_empty'"
    if case == "unknown-chunk":
        qrels.write_text(qrels.read_text() + "q_lead\tnope\t1\n")
        return ds, "all.tsv:10: unknown corpus id 'nope'"
    if case == "unknown-query":
        qrels.write_text(qrels.read_text() + "q_nope\tlead\t1\n")
        return ds, "all.tsv:10: unknown query id 'q_nope'"
    if case == "bad-header":
        qrels.write_text("qid\tcid\tscore\n" + qrels.read_text().split("\n", 1)[1])
        return ds, "all.tsv:1: expected header"
    if case == "missing-column":
        qrels.write_text(qrels.read_text() + "q_lead\tlead\n")
        return ds, "all.tsv:10: expected 3 tab-separated columns"
    raise ValueError(case)


BAD = ["malformed-json", "missing-id", "duplicate-id", "empty-text", "unknown-chunk", "unknown-query", "bad-header",
       "missing-column"]


@pytest.mark.parametrize("case", BAD)
def test_bad_dataset_gives_one_line_and_writes_nothing(case, tmp_path):
    src, words = corrupt(tmp_path, case)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", str(src), "--out", str(out)])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and r.output.startswith("Error: ") and words in r.output, r.output
    assert "Traceback" not in r.output
    assert not out.exists() or not any(out.rglob("*.*"))
    # split reads the same files and refuses the same way, leaving no split behind
    r = CliRunner().invoke(main, ["split", str(src)])
    assert r.exit_code == 1 and words in r.output
    assert not (src / "qrels" / "test.tsv").exists()


@pytest.mark.parametrize("content, words", [
    ("[{\"input_chunk\": \"text\"}]", "missing questions"),
    ("[{\"questions\": [\"q\"]}]", "missing chunk text"),
    ("[{\"input_chunk\": \"\", \"questions\": [\"q\"]}]", "empty chunk text"),
    ("[{\"input_chunk\": \"t\", \"questions\": [\"\"]}]", "empty question"),
    ("{\"queries\": {}, \"corpus\": {}, \"relevant_docs\": {\"q\": [\"c\"]}}", "unknown query id 'q'"),
    ("[1, 2", "malformed JSON"),
])
def test_bad_source_files(content, words, tmp_path):
    src = tmp_path / "src.json"
    src.write_text(content)
    r = CliRunner().invoke(main, ["convert", str(src), "--out", str(tmp_path / "out"), "--format",
                                  "llamaindex" if "relevant_docs" in content else "chunks"])
    assert r.exit_code == 1 and words in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "out" / "corpus.jsonl").exists()


def test_pairs_missing_column_names_line(tmp_path):
    src = tmp_path / "p.csv"
    src.write_text("anchor,body\nq1,chunk one\n")
    with pytest.raises(AdapterError, match=r"p.csv:2: missing column positive"):
        convert(src, tmp_path / "o", fmt="pairs")


def test_unwritable_output_folder(tmp_path):
    src = make_source("llamaindex", tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = CliRunner().invoke(main, ["convert", str(src), "--out", str(blocker / "out")])
    assert r.exit_code == 1 and "cannot create folder" in r.output and r.output.count("\n") == 1


def test_existing_files_survive_a_failed_write(tmp_path, monkeypatch):
    src = make_source("llamaindex", tmp_path)
    out = tmp_path / "out"
    convert(src, out)
    before = (out / "queries.jsonl").read_text()
    import adapter.data as data

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(data.json, "dumps", boom)
    with pytest.raises(RuntimeError):
        convert(src, out, force=True)
    assert (out / "queries.jsonl").read_text() == before
    assert not list(out.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------------------- split


def test_split_by_query_is_seeded_and_complete(tmp_path):
    ds = write_dataset(tmp_path / "ds")
    s1 = split_dataset(ds, by="query", test_fraction=0.3, seed=0)
    first = {n: (ds / "qrels" / f"{n}.tsv").read_text() for n in ("train", "test")}
    split_dataset(ds, by="query", test_fraction=0.3, seed=0, force=True)
    assert first == {n: (ds / "qrels" / f"{n}.tsv").read_text() for n in ("train", "test")}
    loaded = load_dataset(ds)
    assert set(loaded.qrels["train"]) | set(loaded.qrels["test"]) == set(QUESTIONS)
    assert not set(loaded.qrels["train"]) & set(loaded.qrels["test"])
    assert s1["queries"]["test"] == 2 and json.loads((ds / "split.json").read_text())["seed"] == 0
    others = set()
    for seed in range(1, 6):
        split_dataset(ds, by="query", test_fraction=0.3, seed=seed, force=True)
        others.add((ds / "qrels" / "test.tsv").read_text())
    assert len(others - {first["test"]}) >= 1  # other seeds give other splits


def test_split_by_chunk_holds_out_whole_chunks(tmp_path):
    ds = write_dataset(tmp_path / "ds")
    summary = split_dataset(ds, by="chunk", test_fraction=0.34, dev_fraction=0.17, seed=3)
    loaded = load_dataset(ds)
    train_chunks = {c for rels in loaded.qrels["train"].values() for c in rels}
    for split in ("test", "dev"):
        held = {c for rels in loaded.qrels[split].values() for c in rels}
        assert held and not held & train_chunks
    assert len(loaded.corpus) == len(CHUNKS)  # the corpus stays whole
    n = sum(summary["queries"].values()) + summary["dropped_queries"]
    assert n == len(QUESTIONS)


def test_split_without_dev_removes_stale_dev(tmp_path):
    ds = write_dataset(tmp_path / "ds")
    split_dataset(ds, by="query", test_fraction=0.3, dev_fraction=0.3)
    assert (ds / "qrels" / "dev.tsv").exists()
    split_dataset(ds, by="query", test_fraction=0.3, force=True)
    assert not (ds / "qrels" / "dev.tsv").exists()


@pytest.mark.parametrize("args, words", [(["--set", "split.test_fraction=1.5"], "split.test_fraction"),
                                         (["--set", "split.test_fraction=0.5", "--set", "split.dev_fraction=0.6"],
                                          "split.dev_fraction")])
def test_split_bad_fractions(args, words, tmp_path):
    ds = write_dataset(tmp_path / "ds")
    r = CliRunner().invoke(main, ["split", str(ds), *args])
    assert r.exit_code == 1 and words in r.output


def test_missing_split_is_named(tmp_path):
    ds = load_dataset(write_dataset(tmp_path / "ds"))
    with pytest.raises(AdapterError, match="no qrels/test.tsv.*adapter split"):
        ds.split("test")


def test_fingerprint_tracks_training_data(tmp_path):
    folder = write_dataset(tmp_path / "ds", {"train": ["q_burst", "q_lead"]})
    a = fingerprint(load_dataset(folder), "train")
    (folder / "queries.jsonl").write_text((folder / "queries.jsonl").read_text().replace("broken", "burst"))
    assert fingerprint(load_dataset(folder), "train") != a


@pytest.mark.skipif(not APPLEQA.exists(), reason="../shared/data/appleqa is absent")
def test_appleqa_converts(tmp_path):
    ds, fmt = convert(APPLEQA, tmp_path / "apple")
    assert fmt == "chunks" and len(ds.corpus) == 215
    assert sum(len(r) for r in ds.qrels["all"].values()) == 4300  # every question kept, repeats merged


def test_written_files_get_normal_permissions(tmp_path):
    import os
    import stat

    convert(make_source("llamaindex", tmp_path), tmp_path / "out")
    mode = stat.S_IMODE(os.stat(tmp_path / "out" / "corpus.jsonl").st_mode)
    assert mode & 0o044 == 0o044  # group and others may read it, as with any file written the usual way


def test_save_dataset_is_the_inverse_of_load_dataset(tmp_path):
    from adapter.data import save_dataset
    from tests.conftest import write_dataset

    folder = write_dataset(tmp_path / "ds", {"train": ["q_burst", "q_lead"], "test": ["q_meter"]})
    ds = load_dataset(folder)
    back = load_dataset(save_dataset(ds, tmp_path / "copy"))
    assert (back.corpus, back.queries, back.qrels, back.titles) == (ds.corpus, ds.queries, ds.qrels, ds.titles)


# ---------------------------------------------------------------------------------------------------------- what a
# newcomer tripped over (issue 22): JSON Lines named .json, an empty chunk, a tutorial's two files, repeats, re-splits


@pytest.mark.parametrize("shape, detected", [("pairs", "pairs"), ("chunks", "chunks")])
def test_json_lines_under_a_json_name_is_read_by_content(shape, detected, tmp_path):
    """Hugging Face's Dataset.to_json writes JSON Lines, under whatever name it is given (here train.json)."""
    from datasets import Dataset as HFDataset

    if shape == "pairs":
        rows = {"anchor": [q for q, cs in QUESTIONS.values() for _ in cs],
                "positive": [CHUNKS[c] for _, cs in QUESTIONS.values() for c in cs]}
    else:
        rows = {"chunk": list(CHUNKS.values()),
                "questions": [[q for q, cs in QUESTIONS.values() if cid in cs] for cid in CHUNKS]}
    src = tmp_path / "train.json"
    HFDataset.from_dict(rows).to_json(src)
    assert src.read_text().count("\n") == len(rows[next(iter(rows))])  # one object per line, not one JSON value
    assert detect_format(src) == detected
    convert(src, tmp_path / "out")
    assert pairs_of(tmp_path / "out") == expected_pairs()
    # --format names the shape too, whatever the file is called
    convert(src, tmp_path / "named", fmt=detected)
    assert pairs_of(tmp_path / "named") == expected_pairs()


@pytest.mark.parametrize("content", ['{"title": "a", "body": "b"}\n{"title": "c", "body": "d"}\n',
                                     "query\tpassage\nwhat\tit\n"])
def test_where_detection_fails_the_error_names_format(content, tmp_path):
    src = tmp_path / "data.json"
    src.write_text(content)
    r = CliRunner().invoke(main, ["convert", str(src), "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "pass --format (chunks, llamaindex, pairs, beir)" in r.output and "data.json" in r.output


def empty_chunk_source(tmp: Path) -> Path:
    """The tiny dataset as chunks JSON, the lead-pipe chunk's text emptied: its one question goes with it."""
    items = [{"chunk_id": cid, "text": "" if cid == "lead" else text,
              "questions": [q for q, cs in QUESTIONS.values() if cid in cs]} for cid, text in CHUNKS.items()]
    path = tmp / "chunks.json"
    path.write_text(json.dumps(items))
    return path


def test_an_empty_chunk_is_named_with_the_way_on(tmp_path, caplog):
    src = empty_chunk_source(tmp_path)
    r = CliRunner().invoke(main, ["convert", str(src), "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "item 5 (chunk 'lead'): empty chunk text; pass --drop-empty" in r.output
    assert not (tmp_path / "out").exists()
    with caplog.at_level("INFO", logger="adapter"):
        r = CliRunner().invoke(main, ["convert", str(src), "--out", str(tmp_path / "out"), "--drop-empty"])
    assert r.exit_code == 0, r.output
    kept = {(q, t) for q, t in expected_pairs() if t != CHUNKS["lead"]}
    assert pairs_of(tmp_path / "out") == kept
    assert "is there lead in the pipes of an old house" not in (tmp_path / "out" / "queries.jsonl").read_text()
    dropped = [r.getMessage() for r in caplog.records if "--drop-empty dropped" in r.getMessage()]
    assert len(dropped) == 1 and "1 empty chunks (" in dropped[0] and "'lead'" in dropped[0]
    assert "with the 1 questions asked only of them" in dropped[0]


def test_empty_questions_are_dropped_and_counted(tmp_path, caplog):
    src = tmp_path / "pairs.jsonl"
    rows = [{"question": q, "text": CHUNKS[c]} for q, cs in QUESTIONS.values() for c in cs]
    rows += [{"question": "  ", "text": CHUNKS["burst"]}, {"question": None, "text": CHUNKS["meter"]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(AdapterError, match=r"pairs.jsonl:9: empty question; pass --drop-empty"):
        convert(src, tmp_path / "out")
    with caplog.at_level("INFO", logger="adapter"):
        convert(src, tmp_path / "out", drop_empty=True)
    assert pairs_of(tmp_path / "out") == expected_pairs()
    assert any(r.getMessage().endswith(": --drop-empty dropped 2 empty questions") for r in caplog.records)


def llamaindex_file(path: Path, qids: list[str], corpus: dict[str, str] | None = None) -> Path:
    """A LlamaIndex EmbeddingQAFinetuneDataset file (as its save_json writes) with the given tiny-dataset queries and
    the chunks they ask about (or ``corpus``)."""
    cids = {c for q in qids for c in QUESTIONS[q][1]}
    path.write_text(json.dumps({"queries": {q: QUESTIONS[q][0] for q in qids},
                                "corpus": corpus or {c: CHUNKS[c] for c in CHUNKS if c in cids},
                                "relevant_docs": {q: QUESTIONS[q][1] for q in qids}, "mode": "text"}))
    return path


def test_a_tutorials_train_and_val_files_become_one_dataset_with_their_split(tmp_path):
    train_q, val_q = list(QUESTIONS)[:4], list(QUESTIONS)[4:]  # q_water (val) shares the burst chunk with train
    train = llamaindex_file(tmp_path / "train_dataset.json", train_q)
    val = llamaindex_file(tmp_path / "val_dataset.json", val_q)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", str(train), str(val), "--out", str(out), "--keep-split"])
    assert r.exit_code == 0, r.output
    assert "detected: llamaindex" in r.output and "split as given: 4 train, 3 test queries" in r.output
    ds = load_dataset(out)
    assert pairs_of(out) == expected_pairs() and ds.corpus == CHUNKS  # 'burst' is in both files: one chunk
    assert set(ds.qrels["train"]) == set(train_q) and set(ds.qrels["test"]) == set(val_q)
    assert set(ds.qrels) == {"all", "train", "test"}
    # without --keep-split: one dataset, every judgement in all.tsv, ready for `adapter split`
    r = CliRunner().invoke(main, ["convert", str(train), str(val), "--out", str(tmp_path / "merged")])
    assert r.exit_code == 0 and set(load_dataset(tmp_path / "merged").qrels) == {"all"}
    assert pairs_of(tmp_path / "merged") == expected_pairs()
    # the given split is a split: `adapter split` refuses to replace it without --force
    r = CliRunner().invoke(main, ["split", str(out)])
    assert r.exit_code == 1 and "qrels/train.tsv: already exists; pass --force" in r.output


def test_a_chunk_id_with_two_texts_in_two_sources_is_one_line(tmp_path):
    train = llamaindex_file(tmp_path / "train.json", ["q_burst"])
    val = llamaindex_file(tmp_path / "val.json", ["q_water"], {"burst": "another text", "chlorine": CHUNKS["chlorine"]})
    r = CliRunner().invoke(main, ["convert", str(train), str(val), "--out", str(tmp_path / "out"), "--keep-split"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "val.json: corpus 'burst': chunk id 'burst' has another text than at" in r.output
    assert "train.json: corpus 'burst'" in r.output and not (tmp_path / "out").exists()


def test_keep_split_wants_two_or_three_sources(tmp_path):
    src = llamaindex_file(tmp_path / "train.json", ["q_burst"])
    r = CliRunner().invoke(main, ["convert", str(src), "--out", str(tmp_path / "out"), "--keep-split"])
    assert r.exit_code == 1 and "--keep-split needs two sources (train, test) or three" in r.output


def test_repeated_question_texts_are_merged_in_one_line_with_the_count(tmp_path, caplog):
    src = make_source("pairs-jsonl", tmp_path)  # q_water is asked of two chunks: two rows, one query
    extra = json.dumps({"question": QUESTIONS["q_lead"][0], "text": CHUNKS["lead"]}) + "\n"  # a row given twice
    src.write_text(src.read_text() + extra)
    with caplog.at_level("INFO", logger="adapter"):
        ds, _ = convert(src, tmp_path / "out")
    lines = [r.getMessage() for r in caplog.records if "repeated question texts merged" in r.getMessage()]
    assert len(lines) == 1 and "2 repeated question texts merged: 9 questions asked, 7 queries" in lines[0]
    assert len(ds.queries) == len(QUESTIONS)


def test_split_refuses_an_existing_split_without_force(tmp_path):
    ds = write_dataset(tmp_path / "ds")
    assert CliRunner().invoke(main, ["split", str(ds), "--seed", "0"]).exit_code == 0
    before = {p.name: p.read_text() for p in (ds / "qrels").iterdir()}
    r = CliRunner().invoke(main, ["split", str(ds), "--seed", "1"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "qrels/train.tsv: already exists; pass --force" in r.output
    assert {p.name: p.read_text() for p in (ds / "qrels").iterdir()} == before
    r = CliRunner().invoke(main, ["split", str(ds), "--seed", "1", "--force"])
    assert r.exit_code == 0 and json.loads((ds / "split.json").read_text())["seed"] == 1


def test_split_says_dropped_queries_once(tmp_path):
    """The count was logged by the library and printed again by the command: the real CLI, its whole output."""
    import os
    import subprocess
    import sys

    ds = write_dataset(tmp_path / "ds")
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", "from cli import main; main()", "split", str(ds), "--by", "chunk",
                          "--set", "split.test_fraction=0.34", "--seed", "1"], capture_output=True, text=True,
                          cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert run.returncode == 0, run.stderr
    said = [line for line in (run.stdout + run.stderr).splitlines() if "dropped" in line]
    assert len(said) == 1 and "1 queries dropped" in said[0], run.stdout + run.stderr
