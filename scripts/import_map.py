"""The package's import map: which floor imports which, and any arrow that runs up or closes a cycle.

    python scripts/import_map.py            # the floor-to-floor arrows, then the problems (exit 1 if any)

tests/test_layering.py runs :func:`problems` on the package (and on a planted bad package: ``root`` names
the package folder to read, ``remedi/`` by default).

A floor is a top-level module or sub-package of ``remedi``. FLOORS lists them bottom first: a module may
import from its own floor or any floor below it. Imports inside functions count too (a lazy import is
still a dependency); ``if TYPE_CHECKING:`` blocks do not.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1] / "remedi"

FLOORS: list[tuple[str, ...]] = [
    ("sandbox", "files"),
    ("tasks",),
    ("model",),
    ("arguments",),
    ("decoding",),
    ("training", "tracking"),
    ("session",),
    ("evaluation", "rl"),
    ("policy",),
    ("lm_eval_tasks",),
    ("harness",),
    ("train_remask_sft", "train_remask_lora", "train_remask_rl", "infer_compare", "eval_gsm_math", "cli",
     "__init__", "__main__"),
]
LEVEL = {name: i for i, names in enumerate(FLOORS) for name in names}


def floor_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(path: Path, module: str, known: set[str], top: str = "remedi") -> set[str]:
    """Absolute names of the ``top`` package's modules ``path`` imports (``from pkg import sub`` counts as
    ``pkg.sub``)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _type_checking(node)
            for n in ast.walk(node)}
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == top}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] == top:
                subs = {f"{name}.{a.name}" for a in node.names}
                out |= subs if all(s in known for s in subs) else subs | {name}
    return out


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the package modules it imports, for every module under the package folder ``root``."""
    mods = {}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        mods[name] = p
    graph = {}
    for name, p in mods.items():
        graph[name] = {m for m in imports(p, name, set(mods), root.name) if m in mods and m != name}
    return graph


def problems(graph: Optional[dict[str, set[str]]] = None, root: Path = ROOT) -> list[str]:
    """Every module on no floor, arrow that runs up (``up: a -> b``) and import cycle (``cycle: a <-> b``) of
    ``graph`` (default: :func:`module_graph` of ``root``); empty when the layering holds."""
    if graph is None:
        graph = module_graph(root)
    out = []
    for a, targets in graph.items():
        fa = floor_of(a)
        if fa not in LEVEL:
            out.append(f"{a}: floor {fa!r} is not in FLOORS")
            continue
        for b in sorted(targets):
            fb = floor_of(b)
            if fb in LEVEL and LEVEL[fb] > LEVEL[fa]:
                out.append(f"up: {a} -> {b}")
    # module-level cycles (Tarjan); package __init__ re-exports are the package itself
    index, low, stack, on, cycles, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            pkgs = {c for c in comp if (root.parent / Path(*c.split("."), "__init__.py")).is_file()}
            real = [c for c in comp if c not in pkgs]
            if len(real) > 1:
                cycles.append(sorted(real))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    out += [f"cycle: {' <-> '.join(c)}" for c in cycles]
    return out


def floor_arrows(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    arrows = defaultdict(set)
    for a, targets in graph.items():
        for b in targets:
            if floor_of(a) != floor_of(b):
                arrows[floor_of(a)].add(floor_of(b))
    return arrows


def main() -> int:
    graph = module_graph()
    arrows = floor_arrows(graph)
    for names in FLOORS:
        for f in names:
            if f in arrows:
                print(f"{f:>18} -> {', '.join(sorted(arrows[f], key=lambda x: (LEVEL.get(x, 99), x)))}")
    bad = problems(graph)
    print("\n".join(bad) if bad else "no arrow runs up; no cycle")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
