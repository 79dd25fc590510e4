"""bench/online_table.py: paired differences by seed, checked against numbers worked by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import online_table  # noqa: E402


def _write(out: Path, name: str, seed: int, ce: float, agree: float, fkl: float) -> None:
    d = out / "students" / f"{name}_s{seed}" / "eval"
    d.mkdir(parents=True)
    (d / "eval.json").write_text(json.dumps({"ce": ce, "teacher_top1_agreement": agree, "fkl_to_teacher": fkl}))


def test_paired_differences_by_seed(tmp_path, capsys):
    for s, (a, b, c) in enumerate([(3.0, 3.5, 3.1), (3.2, 3.6, 3.2), (3.1, 3.4, 3.4)]):
        _write(tmp_path, "kd_online", s, a, 0.5, 1.0)
        _write(tmp_path, "ce_only", s, b, 0.4, 1.5)
        _write(tmp_path, "kd_fkl", s, c, 0.5, 1.0)
    _write(tmp_path, "warm_start", 0, 9.0, 0.1, 9.0)
    res = online_table.load(tmp_path)
    mean, se, n = online_table.paired(res["kd_fkl"], res["kd_online"], "ce")
    # differences 0.1, 0.0, 0.3: mean 0.1333, sd 0.1528, se 0.0882
    assert n == 3 and abs(mean - 0.13333) < 1e-4 and abs(se - 0.08819) < 1e-4
    assert online_table.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| kd_fkl | +0.1333 ± 0.0882 |" in text  # within 2 se: no star
    assert "| ce_only | +0.4000 ± 0.0577 * |" in text  # 0.5, 0.4, 0.3 against online: beyond
    assert "warm_start" not in text
