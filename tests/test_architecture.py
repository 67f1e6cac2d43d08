"""The layering the README's Architecture section describes, checked on the source (ast).

models -> merge/patching -> predictor/embedding -> interactive service -> plugin; evaluation
beside. The plugin uses structsam's public API only; structsam never imports the plugin; the
import graph has no cycle; merge state is written only inside ``structsam.patching``.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("structsam", "napari_structsam")
MAX_FUNCTION_LINES = 80


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = {name: path for p in PACKAGES for name, path in _modules(p).items()}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) of every import anywhere in the module
    (functions included: a lazy import is still an import), relative ones resolved; also
    ``importlib.import_module("...")`` calls with a literal name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append((base, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Call):
            func = node.func
            fname = getattr(func, "attr", getattr(func, "id", ""))
            first = node.args[0] if node.args else None
            if fname in ("import_module", "__import__") and isinstance(first, ast.Constant):
                if isinstance(first.value, str) and not first.value.startswith("."):
                    out.append((first.value, [], node.lineno))
    return out


def _targets(module: str, names: list[str]) -> list[str]:
    """The modules an import loads: ``from pkg import sub`` loads ``pkg.sub`` if a module."""
    hits = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return hits or [module]


def test_plugin_imports_only_the_public_api():
    bad = []
    for name, path in _modules("napari_structsam").items():
        for module, names, line in _imports(name, path):
            if module != "structsam" and not module.startswith("structsam."):
                continue
            parts = module.split(".")
            where = f"{path.relative_to(ROOT)}:{line}"
            if len(parts) > 1 and parts[1] in ("merge", "patching"):
                bad.append(f"{where} imports {module}")
            if any(p.startswith("_") for p in parts):
                bad.append(f"{where} imports the private module {module}")
            bad += [f"{where} imports {module}.{n}" for n in names if n.startswith("_")]
        for node in ast.walk(_tree(path)):  # structsam.merge.X through the package
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "structsam"
                and (node.attr in ("merge", "patching") or node.attr.startswith("_"))
            ):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses structsam.{node.attr}")
    assert not bad, "\n".join(bad)


def test_structsam_never_imports_the_plugin_nor_a_gui():
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for name, path in _modules("structsam").items()
        for module, _, line in _imports(name, path)
        if module.split(".")[0] in ("napari_structsam", "napari", "qtpy", "PyQt5", "PySide2")
    ]
    assert not bad, "\n".join(bad)


def _graph() -> dict[str, set[str]]:
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, names, _ in _imports(name, path):
            for target in _targets(module, names):
                if target in MODULES and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# what a MergeState/MergeConfig holds: assigning to these on a state from outside patching
# would change a shared model's merging behind its configuration's back
def _state_names(tree) -> set[str]:
    """Names bound to ``merge_state(...)``/``merge_config(...)`` results in a module."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.NamedExpr) and isinstance(
            node.value, ast.Call
        ):
            func = node.value.func
            if getattr(func, "id", getattr(func, "attr", "")) in ("merge_state", "merge_config"):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


PATCH_ATTRS = ("_structsam_state", "_structsam_index")  # what patch puts on the modules


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"


def _state_writes(path: Path) -> list[str]:
    tree = _tree(path)
    names = _state_names(tree)
    bad = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("setattr", "delattr"):
            arg = node.args[1] if len(node.args) > 1 else None
            if isinstance(arg, ast.Constant) and arg.value in PATCH_ATTRS:
                bad.append(_where(path, node.lineno))
        for t in targets:
            if not isinstance(t, ast.Attribute | ast.Subscript):
                continue
            owner = t.value
            while isinstance(owner, ast.Attribute | ast.Subscript):  # state.x.y = ...
                if isinstance(owner, ast.Attribute) and owner.attr == "_structsam_state":
                    break
                owner = owner.value
            hit = (
                (isinstance(t, ast.Attribute) and t.attr in PATCH_ATTRS)
                or (isinstance(owner, ast.Attribute) and owner.attr == "_structsam_state")
                or (isinstance(owner, ast.Name) and owner.id in names)
                or (isinstance(owner, ast.Call) and getattr(owner.func, "id", "") == "merge_state")
            )
            if hit:
                bad.append(_where(path, node.lineno))
    return bad


def test_merge_state_is_written_only_inside_patching():
    bad = []
    for name, path in MODULES.items():
        if name == "structsam.patching" or name.startswith("structsam.patching."):
            continue
        bad += _state_writes(path)
    assert not bad, "merge state written outside structsam.patching:\n" + "\n".join(bad)


def test_the_state_write_check_sees_writes(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "state = merge_state(model)\nstate.prompts = None\n"
        "merge_state(model).rates[0] = 0.5\nenc._structsam_state.info = []\n"
        "def f(m):\n    s = merge_state(m)\n    s.record_features = True\n"
    )
    assert len(_state_writes(path)) == 4


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_is_longer_than_80_lines(package):
    long = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                n = node.end_lineno - first + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "\n".join(long)


@pytest.mark.parametrize("module", ["_session.py", "_widget.py"])
def test_plugin_session_and_widget_stay_small(module):
    lines = (ROOT / "napari_structsam" / module).read_text().count("\n")
    assert lines < 450, f"{module}: {lines} lines"


def test_annotate_is_the_plugins_command(capsys):
    """`structsam annotate FILE` runs through the plugin's console script, which adds its
    command to structsam's; structsam's own entry point says where the command is."""
    import tomllib

    from napari_structsam._cli import commands
    from structsam.cli import build_parser, main

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["structsam"] == "napari_structsam._cli:main"
    args = build_parser(commands()).parse_args(["annotate", "scan.nii.gz"])
    assert args.command == "annotate" and args.file == "scan.nii.gz"
    assert main(["annotate", "scan.nii.gz"]) == 2
    assert "napari plugin's" in capsys.readouterr().err
    # through the plugin's script, a missing file is named before napari starts
    from napari_structsam._cli import main as script

    assert script(["annotate", str(ROOT / "no-such-scan.nii.gz")]) == 2
    assert "no-such-scan.nii.gz: no such file" in capsys.readouterr().err
