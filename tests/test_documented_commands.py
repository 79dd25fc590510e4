"""Every documented command line parses and resolves to its stage's config; every option has a config field.

`kdcache report --teacher DIR`, documented in the README and --help, once always failed (`unknown config key
'teacher'`): the option's value went to a key that its config does not have. These tests take every `kdcache`
command line in README.md and docs/*.md, parse it with the real Click command and resolve its options into the
stage's config dataclass exactly as the stage does (`pipeline.config.resolve`), without running the stage.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import click
import pytest

from pipeline.cache.inspection import InspectConfig
from pipeline.config import resolve
from pipeline.data.prepare import PrepareConfig
from pipeline.evaluation.evaluate import EvalConfig
from pipeline.evaluation.report import ReportConfig
from pipeline.interop.export import ExportConfig
from pipeline.teacher.runner import TeacherConfig
from pipeline.training.config import TrainConfig
from stages.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"prepare": PrepareConfig, "teacher": TeacherConfig, "train": TrainConfig, "eval": EvalConfig,
           "report": ReportConfig, "inspect": InspectConfig, "export": ExportConfig}
# Command parameters that are not config keys: the config file, --set, and positional arguments (mapped below).
# --storage-option sets the process's fsspec options (never saved: they may hold secrets), no config field.
NOT_FIELDS = {"config_file", "sets", "storage_option"}
ARGUMENT_FIELD = {"run_dirs": "runs"}  # a positional argument's config field when named otherwise


def documented_lines() -> list[tuple[str, list[str]]]:
    """(where, argv after `kdcache`) for every `kdcache` command in the docs' shell blocks."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for ln in joined.splitlines():
                ln = ln.split("#", 1)[0].strip()
                m = re.search(r"(?:^|\s|/)kdcache\)?\s+(.*)$", ln.replace("$(which kdcache)", "kdcache"))
                if not m or ln.startswith(("pip", "python")) and "kdcache " not in ln:
                    continue
                argv = [a for a in shlex.split(m.group(1)) if a != "..."]
                if argv and argv[0] in {*CONFIGS, "run"}:
                    found.append((f"{doc.name}: {ln}", argv))
    return found


def test_the_docs_document_commands():
    names = {argv[0] for _, argv in documented_lines()}
    assert {"prepare", "teacher", "train", "eval", "report", "inspect", "export", "run"} <= names


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_option_is_a_config_field(name):
    cmd = main.commands[name]
    fields = {f.name for f in dataclasses.fields(CONFIGS[name])}
    for p in cmd.params:
        if p.name in NOT_FIELDS or p.name in ("help",):
            continue
        key = ARGUMENT_FIELD.get(p.name, p.name)
        assert key in fields, f"kdcache {name}: {p.opts[0] if p.opts else p.name} fills {key!r}, not a field " \
                              f"of {CONFIGS[name].__name__}"


@pytest.mark.parametrize("where, argv", documented_lines(), ids=lambda x: x if isinstance(x, str) else None)
def test_documented_command_parses_and_resolves(where, argv):
    name = argv[0]
    cmd = main.commands[name]
    ctx = cmd.make_context(name, argv[1:], resilient_parsing=False)
    if name == "run":
        return  # its options are the run config's path and overrides: parsed above
    typed = {p.name: ctx.params[p.name] for p in cmd.params
             if ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE}
    options = {ARGUMENT_FIELD.get(k, k): (list(v) if isinstance(v, tuple) else v)
               for k, v in typed.items() if k not in NOT_FIELDS and v not in (None, ())}
    resolve(CONFIGS[name], None, typed.get("sets", ()), options)


def test_a_misnamed_option_is_caught():
    """The check above fails for an option whose value goes to no field (the `--teacher` defect, planted)."""
    bad = click.option("--teacher")(lambda **kw: None)
    probe = click.command()(bad)
    fields = {f.name for f in dataclasses.fields(ReportConfig)}
    assert [p.name for p in probe.params if p.name not in fields] == ["teacher"]
