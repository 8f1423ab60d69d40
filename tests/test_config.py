"""The one defaults block: sections, flat names routed to their section, and the round trip artifacts rely on."""

import pytest

from adapter.config import FLAT, SECTIONS, Config, setting_keys


def test_flat_names_route_to_their_section_and_shared_names_go_by_section():
    cfg = Config().replace(rank=16, cache_dir="c", size=100, by="chunk", split="dev", dims=(64,), seed=7,
                           train={"epochs": 3}, finetune={"epochs": 2}, **{"llm.temperature": 0.5, "store.k": 5})
    assert (cfg.train.rank, cfg.encoder.cache_dir, cfg.chunk.size, cfg.split.by) == (16, "c", 100, "chunk")
    assert (cfg.evaluate.split, cfg.evaluate.dims, cfg.seed) == ("dev", (64,), 7)
    assert (cfg.train.epochs, cfg.finetune.epochs, cfg.llm.temperature, cfg.store.k) == (3, 2, 0.5, 5)
    assert cfg.train.lr == Config().train.lr  # a section dict replaces only the fields it names
    assert Config().train.epochs == 10 and Config().finetune.epochs == 4  # the original is untouched
    with pytest.raises(TypeError, match="epochs.*train, lora, finetune, rerank"):  # a shared name says where it lives
        Config().replace(epochs=3)


def test_none_is_ignored_and_unknown_names_are_refused():
    assert Config().replace(rank=None, **{"train.epochs": None}) == Config()
    with pytest.raises(TypeError, match="no_such_field"):
        Config().replace(no_such_field=1)
    for old in ("encode_batch_size", "search_k", "store_batch", "finetune_epochs", "model"):  # former names
        with pytest.raises(TypeError):
            Config().replace(**{old: 1})


def test_flat_names_are_one_per_field_of_one_section():
    """FLAT holds a bare field name exactly when one section has that field, and it routes there: a field added
    under a name another section has, or an alias, would make a name mean two settings or one setting two names."""
    import dataclasses
    from collections import Counter

    owners = Counter(f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls))
    assert set(FLAT) == {name for name, n in owners.items() if n == 1}
    for name, (section, field_name) in FLAT.items():
        assert name == field_name and field_name in {f.name for f in dataclasses.fields(SECTIONS[section])}
    assert len(FLAT) <= 109  # issue #25: at most half of the 219 flat names before it


def test_every_field_can_be_set_from_text_and_reads_back_its_default():
    """Each field's type is one --set can parse, and its default written as text parses back to itself: a field of
    an unparseable type (a dict, a Path) or whose default its annotation cannot hold fails here."""
    import dataclasses

    def as_text(v) -> str:
        return "none" if v is None else ",".join(map(str, v)) if isinstance(v, tuple) else str(v)

    default = Config()
    for key in setting_keys():
        section, _, name = key.partition(".")
        value = getattr(getattr(default, section), name) if name else default.seed
        back = default.with_settings([f"{key}={as_text(value)}"])
        got = getattr(getattr(back, section), name) if name else back.seed
        same_type = type(got) is type(value) or (type(got), type(value)) == (float, int)  # 3000 is a float too
        assert got == value and same_type, (key, value, got)
    assert len(setting_keys()) == sum(len(dataclasses.fields(c)) for c in SECTIONS.values()) + 1


@pytest.mark.parametrize(("setting", "field", "value"), [
    ("train.epochs=5", ("train", "epochs"), 5), ("train.lr=1e-3", ("train", "lr"), 1e-3),
    ("train.bias=yes", ("train", "bias"), True), ("rerank.fusion=false", ("rerank", "fusion"), False),
    ("train.rank=none", ("train", "rank"), None), ("train.rank= 8 ", ("train", "rank"), 8),
    ("evaluate.dims=256,128", ("evaluate", "dims"), (256, 128)), ("serve.cors_origins=", ("serve", "cors_origins"), ()),
    ("train.identity_penalty=0.3", ("train", "identity_penalty"), 0.3),
    ("llm.prompt=p=q.txt", ("llm", "prompt"), "p=q.txt"),  # only the first "=" separates
    ("embedding.query_prefix=query: ", ("embedding", "query_prefix"), "query: "),  # a string keeps its spaces
    ("embedding.query_prefix= None", ("embedding", "query_prefix"), None),
])
def test_settings_are_parsed_by_the_field_type(setting, field, value):
    cfg = Config().with_settings([setting])
    got = getattr(getattr(cfg, field[0]), field[1])
    assert got == value and type(got) is type(value)
    assert Config().with_settings(["seed=3", "train.epochs=2", "train.epochs=4"]).seed == 3
    assert Config().with_settings(["train.epochs=2", "train.epochs=4"]).train.epochs == 4  # the last one wins


@pytest.mark.parametrize(("setting", "words"), [
    ("train.epoch=5", "unknown setting 'train.epoch'; did you mean train.epochs"),
    ("epochs=5", "did you mean train.epochs, lora.epochs, finetune.epochs, rerank.epochs"),
    ("trainer.lr=1", "unknown setting 'trainer.lr'; did you mean train.lr"),
    ("nosection.zzz=1", "sections are encoder, split"),
    ("train.epochs", "expected section.field=value"),
    ("train.epochs=five", "train.epochs takes an integer, got 'five'"),
    ("train.lr=nan", "train.lr takes a finite number"),
    ("train.bias=maybe", "train.bias takes true or false"),
    ("train.lr=0", "train.lr must be > 0, got 0"),
    ("report.bootstrap_samples=0", "report.bootstrap_samples must be >= 1, got 0"),
    ("train.rank=none,", "train.rank takes an integer"),
    ("train.identity_penalty=auto", "train.identity_penalty takes a number, got 'auto'"),  # one way to choose
    ("train.identity_penalty=nan", "train.identity_penalty takes a finite number"),  # not the word "nan"
])
def test_bad_settings_are_one_line_errors_naming_the_key(setting, words):
    from adapter.config import SettingError
    from adapter.errors import AdapterError

    with pytest.raises(SettingError) as e:
        Config().with_settings([setting])
    assert words in str(e.value) and "\n" not in str(e.value) and isinstance(e.value, AdapterError)


def test_bounds_name_real_keys():
    from adapter.config import BOUNDS

    assert set(BOUNDS) <= set(setting_keys()) and all(b.split()[0] in (">", ">=") for b in BOUNDS.values())


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


def _literal_defaults(source: str):
    """(where, name, value) for each literal default in ``source``: function parameters and class-body fields
    (dataclass fields become ``__init__`` defaults)."""
    import ast

    def literal(node):
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return -node.operand.value
        return node.value if isinstance(node, ast.Constant) else None

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            a = node.args
            positional = a.posonlyargs + a.args
            given = [*zip(positional[len(positional) - len(a.defaults):], a.defaults, strict=True),
                     *((k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is not None)]
            for arg, default in given:
                yield f"{getattr(node, 'name', 'lambda')}:{default.lineno}", arg.arg, literal(default)
        elif isinstance(node, ast.ClassDef):
            for st in node.body:
                if isinstance(st, ast.AnnAssign) and st.value is not None and isinstance(st.target, ast.Name):
                    yield f"{node.name}:{st.lineno}", st.target.id, literal(st.value)


def restated_defaults(sources: dict[str, str]) -> list[str]:
    """Defaults written as literals outside adapter/config.py where config.py is the place for them: a number other
    than 0 and +-1 (a setting's value, or a tuning constant that deserves a name), any literal seed, or a string that
    is some config field's default ("test", "cosine", "OPENAI_API_KEY"). A name (``StoreConfig.k``, ``SEARCH_BLOCK``)
    or None -> ``Config()`` is how a default is read instead."""
    import dataclasses

    config_strings = {v for name in SECTIONS for v in dataclasses.asdict(getattr(Config(), name)).values()
                      if isinstance(v, str) and v}
    found = []
    for module, source in sources.items():
        for where, name, value in _literal_defaults(source):
            if value is None or isinstance(value, bool):
                continue
            number = isinstance(value, int | float)
            if (number and (value not in (0, 1, -1) or name == "seed")) or value in config_strings:
                found.append(f"{module}:{where} {name}={value!r}")
    return found


def test_defaults_live_only_in_config():
    from pathlib import Path

    import adapter

    folder = Path(adapter.__file__).parent
    sources = {p.name: p.read_text() for p in sorted(folder.glob("*.py")) if p.name != "config.py"}
    assert restated_defaults(sources) == []
    # the rule bites: a restated k, seed, split or block size is found
    planted = ("def search_index(index, queries, k: int = 10, *, seed: int = 0, split: str = 'test'): ...\n"
               "class System:\n    rerank_k: int = 20\n    fusion: float = 0.0\n")
    assert restated_defaults({"planted.py": planted}) == [
        "planted.py:search_index:1 k=10", "planted.py:search_index:1 seed=0", "planted.py:search_index:1 split='test'",
        "planted.py:System:3 rerank_k=20"]
