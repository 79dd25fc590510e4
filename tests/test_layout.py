"""The layout is the architecture: `pipeline/` imports only downward, so the two stages stay visible.

Every import in `pipeline/` (module level and inside functions, read with `ast`) must go from a module to one
on a strictly lower layer, or stay inside its own folder; and the graph of modules has no cycle. Layers, from
the bottom:

    0  errors identity config models head records storage (shared foundations: no kdcache concept above them;
                                                           storage/: local paths and fsspec URLs, one client)
    1  cache/  losses/                          (the format; the mathematics: nothing above them)
    2  ownership                                (which files a stage owns; reads the cache's layout)
    3  data/                                    (prepared data, batching, the stream the student reads)
    4  teacher/  training/                      (the two stages, side by side: neither imports the other)
    5  evaluation/  interop/                    (on top of training: held-out figures, reports, exports, API parts)
    6  run  api                                 (the whole pipeline; the public names)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "pipeline"

LAYERS = {
    "errors": 0, "identity": 0, "config": 0, "models": 0, "head": 0, "records": 0, "storage": 0,
    "cache": 1, "losses": 1,
    "ownership": 2,
    "data": 3,
    "teacher": 4, "training": 4,
    "evaluation": 5, "interop": 5,
    "run": 6, "api": 6,
}


def unit_of(module: str) -> str:
    """'pipeline.losses.gate' -> 'losses'; 'pipeline.errors' -> 'errors'; 'pipeline' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, mod: str | None = None) -> set[str]:
    """Every pipeline module `path` (module `mod`) imports, at any depth of the file: function-level imports too."""
    mod = mod or module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("pipeline"):
                continue
            # `from pipeline.cache import layout` names a submodule: count the submodule when there is one.
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if _exists(sub) else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline")}
    return found


def _exists(module: str) -> bool:
    p = ROOT.parent.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py"))}


def test_every_module_has_a_layer():
    missing = sorted({unit_of(m) for m in graph() if unit_of(m) and unit_of(m) not in LAYERS and m != "pipeline"})
    assert not missing, f"modules or folders of pipeline/ with no layer in this test: {missing}"


def test_imports_only_go_down():
    upward = []
    for mod, targets in graph().items():
        src = unit_of(mod)
        if not src:  # pipeline/__init__.py: the version only
            assert not targets, f"pipeline/__init__.py imports {sorted(targets)}"
            continue
        for t in sorted(targets):
            dst = unit_of(t)
            if dst == src and dst not in ("errors", "identity", "config", "models", "head", "records", "run", "api",
                                          "ownership"):
                continue  # inside one folder
            if dst == src:
                upward.append(f"{mod} -> {t} (a module importing itself?)")
            elif not dst or LAYERS[dst] >= LAYERS[src] and not (LAYERS[dst] == LAYERS[src] == 0):
                upward.append(f"{mod} (layer {LAYERS[src]}) -> {t} (layer {LAYERS.get(dst, '?')})")
    assert not upward, "imports that do not go down:\n" + "\n".join(upward)


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, path: list[str]) -> bool:
        state[m] = 1
        for t in sorted(g.get(m, ())):
            t = t if t in g else t.rsplit(".", 1)[0]
            if state.get(t) == 1:
                cycle.extend(path[path.index(t):] + [t] if t in path else [m, t])
                return True
            if state.get(t) is None and t in g and visit(t, path + [t]):
                return True
        state[m] = 2
        return False

    for m in sorted(g):
        if state.get(m) is None and visit(m, [m]):
            break
    assert not cycle, " -> ".join(cycle)


def test_the_check_sees_a_planted_upward_import(tmp_path):
    """The walker must see a function-level import (a planted defect, not the tree's own)."""
    f = tmp_path / "probe.py"
    f.write_text("def f():\n    if True:\n        from pipeline.training.trainer import Trainer\n"
                 "        from ..training import fsdp\n")
    assert imports_of(f, "pipeline.losses.probe") == {"pipeline.training.trainer", "pipeline.training.fsdp"}


def test_no_file_over_600_lines():
    long = {str(p.relative_to(ROOT.parent)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"files over 600 lines: {long}"
