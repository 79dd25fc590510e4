"""The command line as a whole: every command's options are documented with their real defaults, and
every command takes --config FILE and repeatable --set key=value.

    .venv/bin/python -m pytest tests/test_cli.py -q
"""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from pipeline.evaluation.evaluate import EvalConfig
from pipeline.interop.export import ExportConfig
from pipeline.cache.inspection import InspectConfig
from pipeline.data.prepare import PrepareConfig
from pipeline.evaluation.report import ReportConfig
from pipeline.teacher.runner import TeacherConfig
from pipeline.training.config import TrainConfig
from stages.cli import main

CONFIGS = {"prepare": PrepareConfig, "teacher": TeacherConfig, "train": TrainConfig, "eval": EvalConfig,
           "report": ReportConfig, "inspect": InspectConfig, "export": ExportConfig}


def options(name: str) -> list[click.Option]:
    return [p for p in main.commands[name].params if isinstance(p, click.Option)]


def help_record(name: str, opt: click.Option) -> str:
    with click.Context(main.commands[name], info_name=name) as ctx:
        return opt.get_help_record(ctx)[1]


def test_every_command_is_registered():
    assert set(main.commands) == {"prepare", "teacher", "train", "eval", "report", "inspect", "run", "export"}


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_option_has_help_and_help_renders(name):
    res = CliRunner().invoke(main, [name, "--help"])
    assert res.exit_code == 0, res.output
    undocumented = [o.opts[0] for o in options(name) if not (o.help or "").strip()]
    assert undocumented == []
    flags = {o.opts[0] for o in options(name)}
    assert {"--config", "--set"} <= flags, "every command takes --config FILE and --set key=value"


def shown(default: object, opt: click.Option) -> str | None:
    """How --help must show a config default: the value itself, as the user would type it."""
    if opt.is_bool_flag:
        return None if not opt.secondary_opts else (opt.opts if default else opt.secondary_opts)[0].lstrip("-")
    if isinstance(default, list):
        return ",".join(str(x) for x in default)
    return str(default)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_help_shows_the_config_dataclass_defaults(name):
    """The defaults printed by --help are the config dataclass's (e.g. --top-k 32), so they cannot drift
    from what an option-less run does; placeholders ("" = taken from elsewhere) are explained instead."""
    fields = {f.name: f for f in dataclasses.fields(CONFIGS[name])}
    checked = 0
    for opt in options(name):
        if opt.name not in fields:
            continue
        default = getattr(CONFIGS[name](), opt.name)
        text = help_record(name, opt)
        want = shown(default, opt)
        if want is None:  # a plain on/off flag: off unless given
            continue
        if default in ("", []):
            assert "[default: (" in text, (opt.opts, text)  # says where the value comes from (or none)
        else:
            assert f"[default: {want}]" in text, (opt.opts, text)
            checked += 1
    assert checked >= 1


def test_explicit_default_value_still_beats_the_config_file(tmp_path, data_file, tokenizer_dir):
    """Options carry their real defaults now; typing one must still override --config, and not typing it
    must not."""
    from pipeline.data.prepare import META_FILENAME
    import json

    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"data: {data_file}\ntokenizer: {tokenizer_dir}\nmax_length: 16\n")
    runner = CliRunner()
    res = runner.invoke(main, ["prepare", "--config", str(cfg), "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "a" / META_FILENAME).read_text())["max_length"] == 16
    res = runner.invoke(main, ["prepare", "--config", str(cfg), "--out", str(tmp_path / "b"), "--max-length", "2048"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "b" / META_FILENAME).read_text())["max_length"] == 2048


def test_inspect_takes_config_and_set(tmp_path, llama_cache):
    cfg = tmp_path / "i.yaml"
    cfg.write_text(f"cache: {llama_cache}\n")
    res = CliRunner().invoke(main, ["inspect", "--config", str(cfg), "--set", "sample_rows=10"])
    assert res.exit_code == 0, res.output
    assert "(10 rows)" in res.output
    res = CliRunner().invoke(main, ["inspect", "--set", "sample_rows=0", str(llama_cache)])
    assert res.exit_code == 1 and "sample_rows must be at least 1" in res.output
    res = CliRunner().invoke(main, ["inspect"])
    assert res.exit_code == 1 and "no cache given" in res.output
