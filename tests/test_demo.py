"""The main job on the bundled data: the demo end to end, and the bundled dataset's own checks."""

import json

import pytest
from click.testing import CliRunner

from adapter.data import load_dataset, split_dataset
from adapter.demo import BUNDLED_DATA, MARKER
from adapter.model import LinearAdapter
from cli import main


def test_bundled_dataset_is_valid_and_big_enough():
    ds = load_dataset(BUNDLED_DATA)
    assert len(ds.corpus) >= 150 and len(ds.queries) >= 8 * len(ds.corpus)
    words = [len(t.split()) for t in ds.corpus.values()]
    assert min(words) >= 80 and max(words) <= 250
    per_chunk = {}
    for rels in ds.qrels["all"].values():
        for c in rels:
            per_chunk[c] = per_chunk.get(c, 0) + 1
    assert min(per_chunk.values()) >= 8 and set(per_chunk) == set(ds.corpus)
    assert not (BUNDLED_DATA / "qrels" / "train.tsv").exists()  # the demo makes its own split


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    r = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out, r.output


def test_demo_shows_the_table_and_where_things_are(demo_run):
    out, output = demo_run
    for words in ("dim 384", "dim 64", "ndcg@10", "accuracy@10", "Δ adapter", "adapter:", "report:",
                  "adapter: recipe "):
        assert words in output
    adapter = LinearAdapter.load(out / "adapter.safetensors")
    assert adapter.dim == 384 and adapter.metadata["trained_on"] == "train"
    assert (out / "report" / "report.md").is_file() and (out / "report" / "ndcg_by_dim.png").is_file()
    results = json.loads((out / "report" / "results.json").read_text())
    assert list(results) == ["base", "adapter"] and list(results["base"]) == ["384", "256", "128", "64"]
    # the bundled data must leave room to improve: the base model is far from perfect on it
    assert results["base"]["384"]["accuracy@10"] < 0.9
    assert results["adapter"]["384"]["ndcg@10"] > results["base"]["384"]["ndcg@10"]


def test_demo_replaces_its_own_folder_only(demo_run, tmp_path):
    out, _ = demo_run
    assert (out / MARKER).is_file()
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    r = CliRunner().invoke(main, ["demo", "--out", str(stranger)])
    assert r.exit_code == 1 and "not written by `adapter demo`" in r.output
    assert (stranger / "notes.txt").read_text() == "keep me"


def test_demo_split_is_the_documented_one(demo_run, tmp_path):
    out, _ = demo_run
    again = tmp_path / "again"
    from adapter.data import convert

    convert(BUNDLED_DATA, again)
    split_dataset(again, by="query", test_fraction=0.2, seed=0)
    assert (again / "qrels" / "test.tsv").read_text() == (out / "data" / "qrels" / "test.tsv").read_text()
