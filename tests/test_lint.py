import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_clean():
    r = subprocess.run(["ruff", "check", "--no-cache", str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_model_apply_path_imports_no_torch():
    """The adapter file must bolt onto any stack: loading and applying it needs numpy and safetensors only."""
    code = "import sys, adapter.model; assert 'torch' not in sys.modules, 'torch imported'"
    if not (ROOT / "adapter" / "model.py").exists():
        pytest.skip("adapter/model.py not written yet")
    r = subprocess.run(["python", "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def _commands(group=None, prefix=""):
    """Every command of the CLI, subgroups' included: {"index build": command, ...}."""
    import click

    from cli import main

    group = group or main
    out = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out.update(_commands(command, f"{prefix}{name} "))
        else:
            out[f"{prefix}{name}"] = command
    return out


def test_the_cli_stays_small_enough_to_hold():
    """Issue #25: `adapter train --help` shows at most 15 options, the whole CLI at most 140 (280 before it): the
    long tail of settings goes through --set, the stores through one --store."""
    import click

    counts = {name: len([p for p in c.params if isinstance(p, click.Option)]) for name, c in _commands().items()}
    assert counts["train"] <= 15, counts["train"]
    assert sum(counts.values()) <= 140, counts
    assert len(counts) == 16  # a new command is welcome; count it here and keep the totals


def test_every_command_that_takes_settings_takes_them_the_same_way():
    """One --set (repeatable, parsed by adapter/config.py) and one --store per command, never a command's own copy."""
    commands = _commands()
    for name in ("split", "embed", "evaluate", "train", "search", "index build", "generate", "finetune",
                 "rerank-train", "compare", "serve", "rag"):
        [option] = [p for p in commands[name].params if "--set" in p.opts]
        assert option.multiple and option.name == "settings", name
    for name, command in commands.items():
        stores = [p for p in command.params if "--store" in p.opts]
        assert all(p.name == "source" for p in stores), name
        assert not {"--index", "--qdrant", "--chroma", "--pgvector", "--collection", "--table",
                    "--corpus-vectors"} & {o for p in command.params for o in p.opts}, name


def test_library_messages_name_the_flag_where_the_command_has_one():
    from cli import _flags, _speak_flags, train

    flags = _flags(train)
    assert flags["train.rank"] == "--rank" and flags["train.recipe"] == "--recipe" and flags["seed"] == "--seed"
    said = _speak_flags("train.rank must be between 1 and 383, got 400; train.ranked and xtrain.rank stay; "
                        "train.epochs must be >= 0 (seed 3)", flags)
    assert said == ("--rank must be between 1 and 383, got 400; train.ranked and xtrain.rank stay; "
                    "train.epochs must be >= 0 (--seed 3)")


def test_a_setting_reaches_the_command_and_a_bad_one_is_one_line(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import adapter.serve
    from cli import main

    seen = {}
    monkeypatch.setattr(adapter.serve, "serve", lambda path, cfg, **kw: seen.update(cfg=cfg))
    (tmp_path / "a.safetensors").write_bytes(b"")
    r = CliRunner().invoke(main, ["serve", "--adapter", str(tmp_path / "a.safetensors"), "--port", "9000", "--set",
                                  "serve.max_batch=8", "--set", "embedding.query_prefix=query: ", "--set", "seed=4"])
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert (cfg.serve.max_batch, cfg.serve.port, cfg.embedding.query_prefix, cfg.seed) == (8, 9000, "query: ", 4)
    r = CliRunner().invoke(main, ["serve", "--adapter", str(tmp_path / "a.safetensors"), "--set", "serve.max_bach=8"])
    assert r.exit_code == 2 and "Invalid value for '--set': unknown setting 'serve.max_bach'; did you mean " \
        "serve.max_batch" in r.output, r.output
    assert r.output.strip().splitlines()[-1].startswith("Error: ")
