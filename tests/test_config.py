"""Stage configs: `--config FILE.yaml`, repeatable `--set key=value`, explicit options, unknown keys.

    .venv/bin/python -m pytest tests/test_config.py -q

Priority (pipeline/config.py): defaults < --config < --set < explicit options. The resolved config
is saved next to the output and must load back into the same dataclass.
"""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from pipeline.config import from_dict, parse_sets, resolve, save_config, to_dict
from pipeline.errors import KdError
from pipeline.data.prepare import PrepareConfig
from pipeline.teacher.runner import TeacherConfig
from stages.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(res, *needles: str) -> None:
    """A user error: exit 1, one `error:` line naming the culprit, no traceback."""
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], lines[0]


# ---- library --------------------------------------------------------------------------------------

def test_priority_defaults_file_sets_options(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("top_k: 8\nbatch_tokens: 512\nseed: 3\ntemperatures: [0.5, 2.0]\n")
    cfg = resolve(TeacherConfig, f, ["batch_tokens=1024", "seed=4"], {"seed": 5, "shard_rows": None})
    assert cfg.top_k == 8  # file
    assert cfg.batch_tokens == 1024  # --set beats the file
    assert cfg.seed == 5  # an explicit option beats --set
    assert cfg.shard_rows == TeacherConfig().shard_rows  # None = option not given: default stays
    assert cfg.temperatures == [0.5, 2.0]


def test_set_values_are_typed(tmp_path):
    cfg = resolve(TeacherConfig, None, ["temperatures=0.5,1.5", "overwrite=true", "top-k=4", "revision="])
    assert cfg.temperatures == [0.5, 1.5] and cfg.overwrite is True and cfg.top_k == 4 and cfg.revision == ""
    assert parse_sets(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize("where", ["file", "set"])
def test_unknown_key_is_named(tmp_path, where):
    f = tmp_path / "t.yaml"
    f.write_text("top_kk: 8\n" if where == "file" else "top_k: 8\n")
    with pytest.raises(KdError, match="unknown config key 'top_kk'"):
        resolve(TeacherConfig, f, ["top_kk=8"] if where == "set" else [])


@pytest.mark.parametrize("sets, needle", [(["top_k=many"], "top_k"), (["top_k=-1"], "top_k"),
                                          (["preset=tiny"], "preset"),
                                          (["temperatures=0,1"], "temperatures"), (["nokey"], "key=value")])
def test_bad_values_are_named(sets, needle):
    with pytest.raises(KdError, match=needle):
        resolve(TeacherConfig, None, sets)


def test_config_file_errors(tmp_path):
    with pytest.raises(KdError, match="not found"):
        resolve(TeacherConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(KdError, match="mapping"):
        resolve(TeacherConfig, bad)


def test_saved_config_round_trips(tmp_path):
    cfg = TeacherConfig(data="d", model="m", out="o", top_k=5, temperatures=[0.5, 3.0], tail_samples=2)
    save_config(cfg, tmp_path / "config.yaml")
    back = from_dict(TeacherConfig, yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert to_dict(back) == to_dict(cfg)


# ---- command line ---------------------------------------------------------------------------------

def test_prepare_cli_config_set_and_option(tmp_path, data_file, tokenizer_dir):
    f = tmp_path / "prep.yaml"
    f.write_text(yaml.safe_dump({"data": str(data_file), "tokenizer": str(tokenizer_dir), "max_length": 16,
                                 "format": "text", "text_field": "prompt"}))
    out = tmp_path / "prep"
    res = invoke("prepare", "--config", f, "--set", "max_length=24", "--set", "format=prompt-response",
                 "--max-length", 40, "--out", out)
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_length"] == 40  # option > --set > file
    assert saved["format"] == "prompt-response"  # --set > file
    assert saved["text_field"] == "prompt"  # file > default
    assert saved["out"] == str(out)
    assert from_dict(PrepareConfig, saved).identity() == PrepareConfig(**saved).identity()


@pytest.mark.parametrize("args, needle", [(["--set", "max_lenght=3"], "max_lenght"),
                                           (["--set", "max_length=ten"], "max_length")])
def test_prepare_cli_bad_keys_one_line(tmp_path, data_file, tokenizer_dir, args, needle):
    res = invoke("prepare", "--data", data_file, "--tokenizer", tokenizer_dir, "--out", tmp_path / "p", *args)
    one_line_error(res, needle)
    assert not (tmp_path / "p").exists()


def test_teacher_cli_config_file(tmp_path, prepared_dir, llama_dir):
    f = tmp_path / "teacher.yaml"
    f.write_text(yaml.safe_dump({"data": str(prepared_dir), "model": str(llama_dir), "top_k": 8,
                                 "temperatures": [0.5, 2.0], "shard_rows": 100000, "device": "cpu"}))
    out = tmp_path / "cache"
    res = invoke("teacher", "--config", f, "--set", "top_k=6", "--set", "seed=9", "--temperatures", "0.8,1.25",
                 "--out", out)
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["top_k"] == 6 and saved["seed"] == 9 and saved["temperatures"] == [0.8, 1.25]
    from pipeline.cache import open_cache

    c = open_cache(out)
    assert c.k == 6 and c.temperatures == [0.8, 1.25]
    assert c.read(0, 3)["topk_ids"].shape == (3, 6)

    res = invoke("teacher", "--config", f, "--set", "colour=red", "--out", tmp_path / "c2")
    one_line_error(res, "colour")


def test_a_change_reads_as_its_text_and_keeps_its_values_across_processes():
    """`errors.Change`: what differs in a stored artifact, the text users read and the values code decides on."""
    import pickle

    from pipeline.errors import Change, StaleOutput

    c = Change("top_k", 8, 6)
    assert c == "top_k 8 -> 6"
    assert ", ".join([c, Change("data", 1, 2, text="prepared data")]) == "top_k 8 -> 6, prepared data"
    e = pickle.loads(pickle.dumps(StaleOutput("stale", [c])))
    assert (e.changes[0].key, e.changes[0].old, e.changes[0].new, str(e.changes[0])) == ("top_k", 8, 6, "top_k 8 -> 6")
