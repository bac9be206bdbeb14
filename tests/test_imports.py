"""The package's import graph, read from the source (ast; nothing imported): no module imports one that imports
it back, and imports sit at the top of their module. A function-local import is allowed only for a third-party
package in LAZY, for the reason given there, and only where the module does not import that package at its top."""

import ast
import sys

from conftest import ROOT

PACKAGES = ("neox_jax", "configs")

LAZY = {  # third-party packages a function may import, and why
    "jax": "modules the scripts import before they configure the backend (cli -> metrics, energy; targets) and "
           "data modules that tools and preprocessing workers import without starting JAX",
    "grain": "pulls in JAX (as above); only the training pipeline's datasets need it",
    "torch": "optional (the test extra): HF references and .bin checkpoints only",
    "transformers": "optional (the test extra): HF references only",
    "lm_eval": "optional (the test extra): evaluation only",
    "codecarbon": "imported by the energy meter's thread only, so a machine without it still trains",
    "wandb": "optional: only with train.wandb_project",
    "tensorboardX": "seconds to import (protobuf); only the process that writes the logs opens a writer",
    "matplotlib": "heavy; only when a plot is drawn",
    "pyarrow": "only Parquet inputs read it (neox_jax/data/documents.py, a module every data worker imports)",
    "datasets": "optional (the test extra, through lm-eval): saved and hub datasets as preprocessing input only",
    "scipy": "its optimizer loads in a third of a second; only the scaling-law fits (neox_jax/scaling.py) use it",
}



def modules():
    """{dotted name: (path relative to the root, parsed tree)} of every module of PACKAGES."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = (rel.as_posix(), ast.parse(path.read_text(), str(rel)))
    return out


def imported_names(node, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement reads (`from a import b` reads `a.b` if that is a module, else `a`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def local_imports(tree):
    """Import statements inside function bodies."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    yield sub


def graph(mods) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in the file), a package counting as its __init__."""
    edges = {}
    for name, (rel, tree) in mods.items():
        is_package = rel.endswith("__init__.py")
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets |= {n for n in imported_names(node, name, is_package) if n in mods and n != name}
        edges[name] = targets
    return edges


def cycles(edges) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(graph(modules())) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_are_at_module_top():
    problems = []
    for name, (rel, tree) in modules().items():
        top = {n.split(".")[0] for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
               for n in imported_names(node, name, rel.endswith("__init__.py"))}
        for node in local_imports(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                names = imported_names(node, name, rel.endswith("__init__.py"))[:1]
            for dotted in names:
                root = dotted.split(".")[0]
                where = f"{rel}:{node.lineno} imports {dotted} inside a function"
                if root in PACKAGES:
                    problems.append(f"{where}: import package modules at the top")
                elif root in sys.stdlib_module_names:
                    problems.append(f"{where}: the standard library belongs at the top")
                elif root not in LAZY:
                    problems.append(f"{where}: not a package allowed to load lazily (tests/test_imports.py LAZY)")
                elif root in top:
                    problems.append(f"{where}: the module already imports {root} at its top")
    assert not problems, "\n".join(problems)


def module_top_imports(mods) -> dict[str, set[str]]:
    """Module -> every dotted name it imports outside function bodies (what importing it loads)."""
    out = {}
    for name, (rel, tree) in mods.items():
        names, todo = set(), list(tree.body)
        while todo:
            node = todo.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names |= set(imported_names(node, name, rel.endswith("__init__.py")))
            todo.extend(ast.iter_child_nodes(node))
        out[name] = names
    return out


def test_preprocessing_workers_never_load_jax_or_grain():
    """Preprocessing worker processes import neox_jax.data.preprocess (and with it the package neox_jax.data):
    nothing that loads at import time may pull in JAX or grain."""
    mods = modules()
    tops = module_top_imports(mods)
    seen, todo, third_party = set(), ["neox_jax.data.preprocess"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in mods]  # its packages
        for dotted in tops[name]:
            if dotted in mods:
                todo.append(dotted)
            elif dotted.split(".")[0] not in PACKAGES:
                third_party.add(dotted.split(".")[0])
    assert {"neox_jax.data", "neox_jax.data.tokenizer", "neox_jax.data.indexed"} <= seen
    assert not third_party & {"jax", "jaxlib", "grain", "flax", "optax", "orbax"}, sorted(seen)
