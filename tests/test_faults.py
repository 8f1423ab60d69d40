"""Bad input and faults (issue #13): each reproduction as a test, and a property test of the readers.

The full table over every command (subprocesses, the real CLI) is tests/fault_cases.py, run by test_fault_table and
bench/bench_faults.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter.data import convert, load_dataset, save_dataset
from adapter.errors import AdapterError
from cli import main
from tests.conftest import QUESTIONS, write_dataset


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


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
