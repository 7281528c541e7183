"""The layering rules of docs/architecture.md, checked on the source (imports read from the AST).

Each rule says who may import whom; a failure names the module, the line and the rule, so
that a change that breaks one is seen before it is merged, not in the next review.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "streamvi"
PLUGINS = REPO / "plugins"
PLUGIN_PACKAGES = ("streamvi_crystfel", "streamvi_dials", "streamvi_om", "streamvi_sim")
#: what plugins may import of streamvi: the documented contract (docs/architecture.md)
CONTRACT = ("streamvi", "streamvi.wire", "streamvi.sources", "streamvi.symmetry",
            "streamvi.errors")
#: the modules shared by every layer (top level of the package)
#: layer → the layers it may import (besides the shared modules and itself)
LAYERS = {
    "ingest": set(),
    "quality": set(),
    "merging": {"quality"},
    "publish": {"quality"},
    "producers": {"ingest"},
    "service": {"ingest", "merging", "quality", "publish"},
    "cli": {"ingest", "merging", "quality", "publish", "service", "producers"},
}


@dataclass
class Module:
    """One module's imports, as written (lazy ones inside functions included)."""

    name: str
    path: Path
    #: (imported name, line): every ``import x``, and ``x.y`` for ``from x import y``
    imports: list[tuple[str, int]] = field(default_factory=list)
    #: imports made only for type checkers (``if TYPE_CHECKING:``)
    typing_imports: list[tuple[str, int]] = field(default_factory=list)
    #: lines where ``sys.argv`` (or ``argv`` imported from sys) is read
    argv_lines: list[int] = field(default_factory=list)
    #: lines where the builtin ``open`` is called
    open_lines: list[int] = field(default_factory=list)

    @property
    def layer(self) -> str | None:
        parts = self.name.split(".")
        return parts[1] if len(parts) > 2 and parts[1] in LAYERS else None


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_module(path: Path, root: Path) -> Module:
    mod = Module(_module_name(path, root), path)
    tree = ast.parse(path.read_text(), str(path))
    package = mod.name if path.name == "__init__.py" else mod.name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for sub in child.body:         # read by type checkers only
                    before = len(mod.imports)
                    visit(sub)
                    mod.typing_imports += mod.imports[before:]
                    del mod.imports[before:]
                for sub in child.orelse:       # only the else branch runs
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                mod.imports += [(a.name, child.lineno) for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # ``from a.b import c``: the module a.b.c when there is one, else a.b
                mod.imports += [(f"{base}.{a.name}", child.lineno) for a in child.names]
                if base == "sys" and any(a.name == "argv" for a in child.names):
                    mod.argv_lines.append(child.lineno)
            elif isinstance(child, ast.Attribute) and child.attr == "argv" and \
                    isinstance(child.value, ast.Name) and child.value.id == "sys":
                mod.argv_lines.append(child.lineno)
            elif isinstance(child, ast.Call) and isinstance(child.func, ast.Name) and \
                    child.func.id == "open":
                mod.open_lines.append(child.lineno)
            visit(child)

    visit(tree)
    return mod


def _modules(root: Path, top: str) -> dict[str, Module]:
    out = {}
    for path in sorted((root / top).rglob("*.py")):
        m = read_module(path, root)
        out[m.name] = m
    return out


MODULES = _modules(REPO, "streamvi")
PLUGIN_MODULES = {name: m for pkg in PLUGIN_PACKAGES
                  for name, m in _modules(PLUGINS / pkg.removeprefix("streamvi_"), pkg).items()}


def internal(name: str) -> str | None:
    """The streamvi module an import names (``from a.b import c``: a.b.c if it is a module,
    else a.b), or None for anything outside the package."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def where(m: Module, line: int) -> str:
    return f"{m.path.relative_to(REPO)}:{line}"


def edges(*, typing: bool = False) -> dict[str, set[str]]:
    """Module → the package modules it imports (``typing``: type-checking imports too)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for m in MODULES.values():
        for imp, _ in m.imports + (m.typing_imports if typing else []):
            target = internal(imp)
            # importing a subpackage runs its parents' __init__ too, but those hold only
            # docstrings and re-exports: the edge that matters is to the module named
            if target is not None and target != m.name and target != "streamvi":
                graph[m.name].add(target)
    return graph


def test_the_package_is_read():
    assert "streamvi.wire" in MODULES and "streamvi.cli.main" in MODULES
    assert len(PLUGIN_MODULES) > 10


def test_no_import_cycles():
    """No module imports itself back through others (lazy imports inside functions and
    imports for type checkers count: a cycle broken only by importing late, or hidden behind
    TYPE_CHECKING, is still a knot to untie)."""
    graph = edges(typing=True)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def strongconnect(v: str) -> None:     # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strongconnect(v)
    assert not cycles, "import cycles: " + "; ".join(" ↔ ".join(c) for c in cycles)


def test_layers_import_only_what_they_may():
    """Each layer imports the shared top-level modules, itself and the layers below it
    (LAYERS); shared modules import no layer at all."""
    bad = []
    for m in MODULES.values():
        allowed = LAYERS.get(m.layer, set()) if m.layer else set()
        for imp, line in m.imports:
            target = internal(imp)
            if target is None or target == m.name:
                continue
            t_layer = MODULES[target].layer
            if t_layer is None or t_layer == m.layer or t_layer in allowed:
                continue
            if m.name in ("streamvi.cli", "streamvi.service", "streamvi.__main__"):
                continue           # a package's own re-exports
            bad.append(f"{where(m, line)}: {m.name} ({m.layer or 'shared'}) imports "
                       f"{target} ({t_layer})")
    assert not bad, "imports across layers against docs/architecture.md:\n" + "\n".join(bad)


def test_argv_is_read_only_by_the_cli():
    bad = [where(m, line) for m in MODULES.values() if m.layer != "cli"
           for line in m.argv_lines]
    bad += [where(m, line) for m in PLUGIN_MODULES.values() for line in m.argv_lines]
    assert not bad, "sys.argv read outside streamvi/cli: " + ", ".join(bad)


def test_plugins_are_imported_only_by_the_cli_and_the_service():
    """The core finds plugins through the entry points (streamvi.sources); only the
    command line and the service may name a plugin package."""
    bad = []
    for m in MODULES.values():
        if m.layer in ("cli", "service"):
            continue
        for imp, line in m.imports:
            if imp.split(".")[0] in PLUGIN_PACKAGES:
                bad.append(f"{where(m, line)}: {m.name} imports {imp}")
    assert not bad, "plugin packages imported outside cli and service:\n" + "\n".join(bad)


def test_plugins_import_only_the_contract():
    bad = []
    for m in PLUGIN_MODULES.values():
        for imp, line in m.imports:
            if imp.split(".")[0] != "streamvi":
                continue
            if internal(imp) not in CONTRACT:
                bad.append(f"{where(m, line)}: {m.name} imports {imp}")
    assert not bad, ("plugins may import only " + ", ".join(CONTRACT) + ":\n"
                     + "\n".join(bad))


def test_publishers_read_snapshots():
    """Publishers import neither the service nor the merging internals (trainer, store,
    engine, optimiser), not even for type hints: they are handed snapshots."""
    bad = []
    for m in MODULES.values():
        if m.layer != "publish":
            continue
        for imp, line in m.imports + m.typing_imports:
            target = internal(imp) or ""
            if target.startswith(("streamvi.service", "streamvi.merging")) or \
                    imp.split(".")[0] == "torch":
                bad.append(f"{where(m, line)}: {m.name} imports {imp}")
    assert not bad, "publishers must read snapshots only:\n" + "\n".join(bad)


def _closure(start: str) -> set[str]:
    graph = edges()
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo += graph[v]
    return seen


@pytest.mark.parametrize("module, forbidden", [
    ("streamvi.wire", ("torch", "zmq")),
    ("streamvi.sources", ("torch", "zmq")),
    ("streamvi.snapshot", ("torch", "zmq")),
])
def test_contract_modules_stay_light(module, forbidden):
    """The wire format (any producer can use it) and the snapshot type (publishers read it)
    need neither torch nor ZeroMQ, not even through the modules they import."""
    bad = [f"{where(MODULES[name], line)}: {name} imports {imp}"
           for name in _closure(module) for imp, line in MODULES[name].imports
           if imp.split(".")[0] in forbidden]
    assert not bad, f"{module} must not need {', '.join(forbidden)}:\n" + "\n".join(bad)


#: what the model may not touch: sockets, files, processes, metrics, configuration parsing
MODEL_FORBIDDEN = ("zmq", "socket", "http", "urllib", "os", "pathlib", "io", "tempfile",
                   "shutil", "json", "tomllib", "argparse", "prometheus_client", "subprocess",
                   "logging")


def test_model_knows_tensors_only():
    bad = []
    for m in MODULES.values():
        if not m.name.startswith("streamvi.merging.model"):
            continue
        for imp, line in m.imports:
            target = internal(imp)
            if imp.split(".")[0] in MODEL_FORBIDDEN or \
                    (target is not None and not target.startswith("streamvi.merging.model")):
                bad.append(f"{where(m, line)}: {m.name} imports {imp}")
        bad += [f"{where(m, line)}: {m.name} opens a file" for line in m.open_lines]
    assert not bad, "model/ knows tensors only:\n" + "\n".join(bad)


def test_trainer_knows_no_sockets():
    bad = [f"{where(m, line)}: {m.name} imports {imp}"
           for name in ("streamvi.merging.trainer", "streamvi.merging.engine",
                        "streamvi.merging.store")
           for m in [MODULES[name]] for imp, line in m.imports
           if imp.split(".")[0] in ("zmq", "socket", "http", "prometheus_client")]
    assert not bad, "\n".join(bad)


def test_snapshot_and_publishers_import_without_torch():
    """What the AST says, checked once at run time: a publisher can be used in a process
    that never loads torch."""
    import subprocess

    code = ("import sys\n"
            "import streamvi.snapshot, streamvi.wire, streamvi.publish.metrics, "
            "streamvi.publish.http, streamvi.publish.mtz, streamvi.publish.zmqpub\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
