"""Chunking: recursive cuts on paragraph, sentence and word boundaries, sizes and overlap in characters or tokens,
exact offsets, stable ids, PDFs, and one-line errors."""

from __future__ import annotations

import json
import random
import re
from bisect import bisect_left
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapter.chunking import chunk, chunk_documents, load_tokenizer, read_document, split_text, token_starts
from adapter.config import Config
from adapter.errors import AdapterError

PARAGRAPHS = [
    "Mains flushing runs every spring. Crews open hydrants in sequence so that sediment leaves the pipes. "
    "Customers may see discoloured water for an hour afterwards; it is safe to drink.",
    "Reservoir levels are read every fifteen minutes. When a level falls below a third of capacity, the control room "
    "starts the duty pump and raises a low-level alarm.",
    "A boil water notice is issued when E. coli is found in a sample from the network. It stays in force until two "
    "clean samples are taken a day apart.",
    "Leaks are found with acoustic loggers fixed to valves at night. A logger that hears a steady hiss for three "
    "nights running flags the street for a survey crew.",
]
DOC = "\n\n".join(PARAGRAPHS) + "\n"


def texts(text: str, spans: list[tuple[int, int]]) -> list[str]:
    return [text[a:b] for a, b in spans]


def test_chunks_fit_the_size_overlap_and_cover_the_text():
    text = "\n\n".join(" ".join(f"Valve {p}{i} is {'open' if i % 3 else 'shut'}." for i in range(12)) for p in "abcd")
    spans = split_text(text, 120, 40)
    assert all(b - a <= 120 for a, b in spans)
    assert [a for a, _ in spans] == sorted(a for a, _ in spans)
    covered = set()
    for a, b in spans:
        covered.update(range(a, b))
    assert {i for i, ch in enumerate(text) if not ch.isspace()} <= covered  # nothing lost
    overlaps = [prev_end - a for (_, prev_end), (a, _) in zip(spans, spans[1:], strict=False)]
    assert all(20 < o <= 40 for o in overlaps)  # two whole sentences of about 17 characters each time
    assert all(text[a:b].startswith("Valve") and text[a:b].endswith(".") for a, b in spans)


def test_chunks_end_at_paragraph_breaks_and_overlap_by_whole_sentences():
    # Each paragraph fits in 250 characters but no two do: every chunk ends where a paragraph ends, and the next
    # starts with the last sentence of the paragraph before (when that sentence fits in the overlap).
    chunks = texts(DOC, split_text(DOC, 250, 100))
    assert [c.split("\n\n")[-1] for c in chunks] == PARAGRAPHS
    assert chunks[1] == "Customers may see discoloured water for an hour afterwards; it is safe to drink.\n\n" + \
        PARAGRAPHS[1]


def test_a_long_paragraph_is_cut_at_sentence_ends():
    paragraph = PARAGRAPHS[0]
    chunks = texts(paragraph, split_text(paragraph, 110, 0))
    assert chunks == ["Mains flushing runs every spring. Crews open hydrants in sequence so that sediment leaves the "
                      "pipes.",
                      "Customers may see discoloured water for an hour afterwards; it is safe to drink."]


def test_a_long_sentence_is_cut_between_words():
    sentence = "the pump house valve chamber " * 10
    chunks = texts(sentence, split_text(sentence, 30, 10))
    words = set(sentence.split())
    assert len(chunks) > 5
    for c in chunks:
        assert len(c) <= 30 and set(c.split()) <= words  # no chunk starts or ends inside a word


def test_a_word_longer_than_a_chunk_is_cut_inside():
    text = "short words here " + "x" * 95
    chunks = texts(text, split_text(text, 40, 0))
    assert chunks == ["short words here", "x" * 40, "x" * 40, "x" * 15]


def test_zero_overlap_gives_disjoint_chunks():
    spans = split_text(DOC, 100, 0)
    assert all(b <= a2 for (_, b), (a2, _) in zip(spans, spans[1:], strict=False))


def test_random_texts_keep_every_promise():
    # Seeded fuzz over awkward texts (runs of blank lines, stray marks, long words) in characters and in units.
    rng = random.Random(0)
    alphabet = ["a", "b", " ", ".", "\n", "!", "xxxxx", "word ", "Sentence. ", "\n\n", "  \n \n", "Why so? "]
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        size = rng.randint(1, 50)
        overlap = rng.randint(0, size - 1)
        units = [i for i, ch in enumerate(text) if not ch.isspace() and (i == 0 or text[i - 1].isspace())]
        starts = units if rng.random() < 0.5 else range(len(text))
        spans = split_text(text, size, overlap, None if isinstance(starts, range) else starts)

        def length(a: int, b: int, starts=starts) -> int:
            return bisect_left(starts, b) - bisect_left(starts, a)

        assert all(length(a, b) <= size and text[a:b].strip() == text[a:b] != "" for a, b in spans)
        covered = {i for a, b in spans for i in range(a, b)}
        assert {i for i, ch in enumerate(text) if not ch.isspace()} <= covered
        for (a1, b1), (a2, b2) in zip(spans, spans[1:], strict=False):
            assert a1 < a2 and b1 < b2 and (a2 >= b1 or length(a2, b1) <= overlap)


def test_token_sizes_use_the_encoders_tokenizer():
    tokenizer = load_tokenizer(Config().encoder.model)
    text = DOC * 3
    spans = split_text(text, 40, 20, token_starts(text, tokenizer))
    counts = [len(tokenizer(text[a:b], add_special_tokens=False)["input_ids"]) for a, b in spans]
    assert max(counts) <= 40
    assert max(counts) >= 30  # packed close to the size, not one sentence a chunk
    assert all(b - a > 40 for a, b in spans[:-1])  # tokens, not characters, were counted


def write_pdf(path: Path, pages: list[str]) -> None:
    """A minimal PDF with one Helvetica text line per input line."""
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    objs = ["<< /Type /Catalog /Pages 2 0 R >>",
            f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(len(pages)))}] /Count {len(pages)} >>",
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, page in enumerate(pages):
        stream = "BT /F1 11 Tf 72 720 Td 14 TL " + " ".join(f"({esc(line)}) Tj T*" for line in page.split("\n")) + " ET"
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                    f"/Contents {5 + 2 * i} 0 R >>")
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for k, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{k} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)


@pytest.fixture
def docs(tmp_path: Path) -> list[Path]:
    (tmp_path / "docs").mkdir()
    txt, md, pdf = tmp_path / "docs" / "flushing.txt", tmp_path / "docs" / "alarms.md", tmp_path / "docs" / "leaks.pdf"
    txt.write_text(DOC)
    md.write_text("# Alarms\n\n" + "\n\n".join(PARAGRAPHS[1:3]) + "\n")
    write_pdf(pdf, ["Leaks are found with acoustic loggers.", "A steady hiss for three nights flags the street."])
    return [txt, md, pdf]


def test_pdf_text_is_read_page_by_page(docs: list[Path]):
    text = read_document(docs[2])
    assert "Leaks are found with acoustic loggers." in text
    assert text.index("acoustic") < text.index("\n\n") < text.index("three nights")  # pages joined by a blank line


def test_chunk_writes_stable_ids_sources_and_offsets(tmp_path: Path, docs: list[Path]):
    cfg = Config().replace(chunk={"size": 150, "overlap": 50, "unit": "chars"})
    out = tmp_path / "ds"
    chunks = chunk(docs, out, cfg)
    first = (out / "corpus.jsonl").read_bytes()
    rows = [json.loads(line) for line in first.decode().splitlines()]
    assert [r["_id"] for r in rows] == [c.id for c in chunks]
    assert {r["source"] for r in rows} == {str(d) for d in docs}
    assert all(re.fullmatch(r"(flushing|alarms|leaks)-\d+", r["_id"]) for r in rows)
    for r in rows:  # each chunk is exactly the slice of its document that its offsets name
        assert read_document(r["source"])[r["start"]:r["end"]] == r["text"]
    settings = json.loads((out / "chunk.json").read_text())
    assert settings["chunks"] == len(rows) and settings["unit"] == "chars" and settings["model"] is None
    chunk(docs, out, cfg, force=True)
    assert (out / "corpus.jsonl").read_bytes() == first  # same input, same ids, same bytes


def test_folders_are_searched(tmp_path: Path, docs: list[Path]):
    chunks = chunk_documents([tmp_path / "docs"], size=300, overlap=0, unit="chars")
    assert sorted({c.source for c in chunks}) == sorted(str(d) for d in docs)


def test_scanned_pdf_without_text_is_skipped_with_a_warning(tmp_path: Path, docs: list[Path],
                                                            caplog: pytest.LogCaptureFixture):
    blank = tmp_path / "scan.pdf"
    write_pdf(blank, [""])
    chunks = chunk_documents([docs[0], blank], size=300, overlap=0, unit="chars")
    assert {c.source for c in chunks} == {str(docs[0])}
    assert "scan.pdf: no text" in caplog.text
    with pytest.raises(AdapterError, match="no text in any document"):
        chunk_documents([blank], size=300, overlap=0, unit="chars")


@pytest.mark.parametrize(("setup", "kwargs", "message"), [
    (lambda d: d / "notes.docx", {}, r"notes\.docx: unsupported document type"),
    (lambda d: d / "missing.txt", {}, r"missing\.txt: no such file"),
    (lambda d: d / "latin1.txt", {}, r"latin1\.txt: not UTF-8 text"),
    (lambda d: d / "a.txt", {"overlap": 100}, r"chunk.overlap must be .* below chunk.size"),
    (lambda d: d / "a.txt", {"size": 0}, r"chunk.size must be at least 1"),
    (lambda d: d / "a.txt", {"unit": "words"}, r"chunk.unit must be one of"),
    (lambda d: d / "broken.pdf", {}, r"broken\.pdf: cannot read PDF"),
])
def test_bad_input_is_one_line_naming_the_file(tmp_path: Path, setup, kwargs, message):
    (tmp_path / "notes.docx").write_text("x")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "a.txt").write_text(DOC)
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a pdf")
    args = {"size": 100, "overlap": 10, "unit": "chars", **kwargs}
    with pytest.raises(AdapterError, match=message) as e:
        chunk_documents([setup(tmp_path)], **args)
    assert "\n" not in str(e.value)


def test_same_file_names_would_clash(tmp_path: Path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "manual.txt").write_text(DOC)
    with pytest.raises(AdapterError, match="same name as"):
        chunk_documents([tmp_path / "a" / "manual.txt", tmp_path / "b" / "manual.txt"], size=100, overlap=0,
                        unit="chars")


def test_cli_chunk_refuses_to_replace_a_corpus_without_force(tmp_path: Path, docs: list[Path]):
    from cli import main

    out = tmp_path / "ds"
    args = ["chunk", *map(str, docs), "--out", str(out), "--size", "200", "--overlap", "50", "--unit", "chars"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    n = len((out / "corpus.jsonl").read_text().splitlines())
    assert f"{n} chunks from 3 documents (200 chars, overlap 50)" in r.output
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "already holds a corpus; pass --force" in r.output
    assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0
