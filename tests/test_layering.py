"""The layering rule: the engine's core imports no application.

Applications are the worlds (ppd_engine.worlds.*), the test/bench builders (ppd_engine.testing.*,
bench/) and the command-line entry points that pick a world. Everything else in ppd_engine is core
and must not reach an application through any chain of imports (walked over the package's own
source, imports inside functions included), so a lazy `import ppd_engine.worlds...` inside a core
function fails this test as surely as a top-level one.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ppd_engine"

# Command-line programs: they may import worlds (a run of any world can be trained or sampled).
# ppd_engine.pipelines (from_run) is the library's entry point for a run of any world.
ENTRY_POINTS = {"ppd_engine.__main__", "ppd_engine.cli", "ppd_engine.train", "ppd_engine.sample", "ppd_engine.sweep",
                "ppd_engine.export", "ppd_engine.pipelines"}
FORBIDDEN = ("ppd_engine.worlds", "ppd_engine.testing", "bench")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module `name` imports (absolute names; `from a import b` counts a.b when it is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            for a in node.names:
                if f"{mod}.{a.name}" in known:
                    found.add(f"{mod}.{a.name}")
    # importing a.b.c runs a/__init__ and a.b/__init__ too
    closed = set()
    for m in found:
        parts = m.split(".")
        closed.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return closed


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def _is_app(mod: str) -> bool:
    return mod in ENTRY_POINTS or any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN)


def _reach(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """module -> the module that imported it, for everything `start` reaches."""
    seen = {start: ""}
    todo = [start]
    while todo:
        m = todo.pop()
        for dep in graph.get(m, ()):
            if dep not in seen:
                seen[dep] = m
                if dep in graph:
                    todo.append(dep)
    return seen


def _chain(seen: dict[str, str], end: str) -> str:
    out = [end]
    while seen.get(out[-1]):
        out.append(seen[out[-1]])
    return " <- ".join(out)


def test_the_core_imports_no_application():
    graph = _graph()
    core = sorted(m for m in graph if not _is_app(m))
    assert "ppd_engine.training.trainer" in core and "ppd_engine.config.loader" in core and len(core) > 40
    bad = []
    for m in core:
        seen = _reach(graph, m)
        for dep in seen:
            if dep != m and any(dep == f or dep.startswith(f + ".") for f in FORBIDDEN):
                bad.append(_chain(seen, dep))
                break
    assert not bad, "core modules reach an application:\n" + "\n".join(bad)


def test_the_walk_sees_lazy_imports():
    # The rule is only as good as the walker: an import inside a function body must be found.
    graph = _graph()
    assert "ppd_engine.worlds" in _reach(graph, "ppd_engine.train")  # train.build_parser imports it lazily
    assert "ppd_engine.worlds.toy.run" in graph["ppd_engine.worlds.toy.world"]  # inside ToyWorld.run


def test_worlds_register_through_the_core_registries():
    import ppd_engine.worlds  # noqa: F401
    from ppd_engine.config import config_class
    from ppd_engine.models import FAMILIES
    from ppd_engine.world import WORLDS

    assert {"toy", "pickapic"} <= set(WORLDS) and "toy" in FAMILIES
    assert "toy" in {f.name for f in __import__("dataclasses").fields(config_class())}


def test_the_core_finds_installed_worlds_without_importing_them():
    """eval (core) reads runs of any world: the worlds come from the package's entry points
    (pyproject.toml, group ppd_engine.worlds), not from an import of ppd_engine.worlds."""
    import os
    import subprocess
    import sys

    root = str(PKG.parent)
    code = ("import sys; from ppd_engine.world import WORLDS, get_world; from ppd_engine.models import FAMILIES; "
            "assert not WORLDS and 'toy' not in FAMILIES; get_world('toy'); "
            "print(sorted(WORLDS), 'toy' in FAMILIES, 'ppd_engine.worlds.toy.world' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["['pickapic',", "'toy']", "True", "True"]
