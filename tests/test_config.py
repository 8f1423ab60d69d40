"""The one defaults block: sections, flat names routed to their section, and the round trip artifacts rely on."""

import pytest

from adapter.config import FLAT, SECTIONS, Config


def test_flat_names_route_to_their_section():
    cfg = Config().replace(model="m", epochs=3, finetune_epochs=2, chunk_size=100, llm_model="x", llm_temperature=0.5,
                           temperature=0.2, split="dev", split_by="chunk", search_k=5, seed=7, encode_batch_size=8)
    assert (cfg.encoder.model, cfg.encoder.batch_size, cfg.llm.model) == ("m", 8, "x")
    assert (cfg.train.epochs, cfg.finetune.epochs, cfg.chunk.size) == (3, 2, 100)
    assert (cfg.train.temperature, cfg.llm.temperature) == (0.2, 0.5)
    assert (cfg.evaluate.split, cfg.split.by, cfg.store.k, cfg.seed) == ("dev", "chunk", 5, 7)
    assert Config().train.epochs == 10 and Config().finetune.epochs == 4  # the original is untouched


def test_none_is_ignored_and_unknown_names_are_refused():
    assert Config().replace(epochs=None) == Config()
    with pytest.raises(TypeError, match="no_such_field"):
        Config().replace(no_such_field=1)


def test_every_field_has_a_flat_name():
    import dataclasses

    routed = set(FLAT.values())
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert (name, f.name) in routed


def test_sections_round_trip_and_artifacts_can_store_only_some():
    cfg = Config().replace(dims=(384, 128), rank=16, seed=3)
    d = cfg.to_dict("encoder", "train", "evaluate")
    assert set(d) == {"encoder", "train", "evaluate", "seed"} and d["evaluate"]["dims"] == [384, 128]
    back = Config.from_dict(d)
    assert back.evaluate.dims == (384, 128) and back.train.rank == 16 and back.seed == 3
    assert back.llm == Config().llm  # sections not stored come back as defaults
    assert Config.from_dict(Config().to_dict()) == Config()


def test_the_public_api_is_small_and_loads_lazily():
    import subprocess
    import sys

    import adapter

    assert 10 <= len(adapter.__all__) <= 14 and set(adapter.__all__) == {"Config", "AdapterError", *adapter._LAZY}
    for name in adapter.__all__:
        assert getattr(adapter, name) is not None, name
    code = "import sys, adapter; assert adapter.Config and 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
