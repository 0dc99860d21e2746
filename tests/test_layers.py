"""The package layers, enforced from the code: every import of a project module (at module level or inside a
function) goes to the same layer or a lower one, no project module is imported inside a function, and there is
no import cycle.  The order (ARCHITECTURE.md): util < kernels < load < store < clustering < methods < predictor
< decode < experiments < report < the command modules ``awq/<command>.py``."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["util", "kernels", "load", "store", "clustering", "methods", "predictor", "decode", "experiments", "report",
         "commands"]
PACKAGES = ("awq", "clustering")


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "clustering":
        return "clustering"
    if len(parts) >= 2 and parts[1] in ORDER:
        return parts[1]
    return "commands"  # awq/<command>.py and the package root


def imports(path: Path, mods: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) of every import statement of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_func = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
               for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in PACKAGES:
                continue
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name:
                out.append((name, node.lineno, id(node) in in_func))
    return out


def graph() -> tuple[dict[str, set[str]], list[str]]:
    mods = project_modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    problems = []
    for m, path in mods.items():
        for target, line, inner in imports(path, mods):
            if target == m:
                continue
            edges[m].add(target)
            where = f"{path.relative_to(ROOT)}:{line}"
            if inner:
                problems.append(f"{where}: {target} imported inside a function")
            if ORDER.index(layer(target)) > ORDER.index(layer(m)):
                problems.append(f"{where}: {m} ({layer(m)}) imports {target} ({layer(target)}), a higher layer")
    return edges, problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(edges[nxt]))))
                elif nxt in on:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_every_module_sits_in_a_layer():
    mods = project_modules()
    assert len(mods) > 50
    pkgs = {m.split(".")[1] for m in mods if m.startswith("awq.") and (ROOT / "awq" / m.split(".")[1]).is_dir()}
    assert pkgs <= set(ORDER), f"awq sub-packages outside the layer order: {sorted(pkgs - set(ORDER))}"
    commands = [m for m in mods if layer(m) == "commands" and m != "awq"]
    for m in commands:  # the command modules stay thin: the work lives in the layers
        assert len(mods[m].read_text().splitlines()) <= 12, f"{m} is a command module and should only dispatch"


def test_imports_follow_the_layers():
    _, problems = graph()
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    edges, _ = graph()
    assert cycles(edges) == []


@pytest.mark.parametrize("edges,want", [
    ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_cycle_finder(edges, want):
    assert cycles(edges) == want


def test_layer_checker_sees_upward_and_inner_imports(tmp_path, monkeypatch):
    """The checker itself: a store module importing a method, and an import inside a function, are reported."""
    me = sys.modules[__name__]
    for pkg in ("awq/store", "awq/methods", "clustering"):
        (tmp_path / pkg).mkdir(parents=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "awq" / "__init__.py").write_text("")
    (tmp_path / "awq/methods/m.py").write_text("x = 1\n")
    (tmp_path / "awq/store/s.py").write_text("from awq.methods.m import x\n\ndef f():\n    import awq.methods.m\n")
    monkeypatch.setattr(me, "ROOT", tmp_path)
    _, problems = me.graph()
    assert any("a higher layer" in p and "awq/store/s.py:1" in p for p in problems)
    assert any("inside a function" in p and "awq/store/s.py:4" in p for p in problems)
