"""Shared code asks an objective's spec and never its name (DESIGN.md §9), and batch keys are declared once
(objectives/base.py ``BATCH_KEYS``). Both walk the AST of every module, like tests/test_layers.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from mmssl import config as C
from mmssl.objectives.base import BATCH_KEYS

ROOT = Path(__file__).resolve().parent.parent
NAMES = set(C.objective_names())
TABLE = "mmssl/factory/objectives.py"  # the one place that names objectives: its entries and their builders
# An objective's own files may name its config keys (``"clip.text_cfg"`` in its error messages): its module,
# its config section, its targets and the VLM package. Everywhere else a config key path of one objective
# (``"igpt.palette"``, a ``"clip."`` prefix) is special-casing as much as the bare name.
OWNED = ("mmssl/objectives/", "mmssl/vlm/", "mmssl/targets/", "mmssl/config/objectives.py")
KEY = re.compile("(" + "|".join(sorted(NAMES)) + r")\.[a-z_]*")


def field_defaults(tree: ast.AST) -> set[int]:
    """ids of the default values of annotated class fields (``objective: str = "mae"``): data, not logic."""
    return {
        id(node.value)
        for cls in ast.walk(tree)
        if isinstance(cls, ast.ClassDef)
        for node in cls.body
        if isinstance(node, ast.AnnAssign) and node.value is not None
    }


def table_entries(tree: ast.Module) -> set[int]:
    """ids of the nodes that belong to the objective table: the ``OBJECTIVES`` value and the private functions it
    names, with the private helpers they call. Generic code in the same file (``spec_of``) is not exempt."""
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    table = [
        n.value
        for n in tree.body
        if isinstance(n, (ast.Assign, ast.AnnAssign)) and "OBJECTIVES" in ast.unparse(n).split("=")[0]
    ]
    todo = [n.id for value in table for n in ast.walk(value) if isinstance(n, ast.Name)]
    exempt: set[str] = set()
    while todo:
        name = todo.pop()
        if name.startswith("_") and name in functions and name not in exempt:
            exempt.add(name)
            todo += [n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name)]
    roots = [*table, *(functions[name] for name in exempt)]
    return {id(node) for root in roots for node in ast.walk(root)}


def objective_names_in(source: str, where: str, table: bool = False, keys: bool = True) -> list[str]:
    """Every string constant equal to an objective name, or with ``keys`` equal to one's config key path or
    prefix (``"igpt.palette"``, ``"clip."``), and every attribute named after one that is not a method call
    (``cfg.igpt``, but not ``np.clip(x)``); in the ``table`` file, those outside its entries."""
    tree = ast.parse(source)
    skip = field_defaults(tree) | (table_entries(tree) if table else set())
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Constant) and node.value in NAMES:
            found.append((node.lineno, f"{where}:{node.lineno}: {node.value!r}"))
        elif (
            keys
            and isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and KEY.fullmatch(node.value)
        ):
            found.append((node.lineno, f"{where}:{node.lineno}: {node.value!r}"))
        elif isinstance(node, ast.Attribute) and node.attr in NAMES and id(node) not in called:
            found.append((node.lineno, f"{where}:{node.lineno}: .{node.attr}"))
    return [hit for _, hit in sorted(found)]


def test_no_objective_name_in_shared_code():
    found = []
    for p in sorted([*(ROOT / "mmssl").rglob("*.py"), *(ROOT / "tools").glob("*.py")]):
        where = str(p.relative_to(ROOT))
        found += objective_names_in(
            p.read_text(), where, table=where == TABLE, keys=not where.startswith(OWNED)
        )
    assert not found, (
        "objective names outside the objective table entries (ask factory.spec_of(cfg)):\n" + "\n".join(found)
    )


def test_the_name_checker_sees_special_cases():
    source = (
        "if cfg.objective == 'igpt':\n    values.igpt.palette = None\n"
        "view = VIEWS['clip']\n"
        "class Config:\n    objective: str = 'mae'\n"
        "x = images.clip(0, 1)\n"
        "OmegaConf.update(values, 'igpt.palette', None)\n"
        "own = [k for k in state if k.startswith('clip.')]\n"
        "msg = 'see clip.model for details'\n"
    )
    hits = [hit.split(": ")[1] for hit in objective_names_in(source, "x")]
    assert hits == ["'igpt'", ".igpt", "'clip'", "'igpt.palette'", "'clip.'"]
    table = (
        "def _igpt(cfg):\n    return _helper(cfg)\n"
        "def _helper(cfg):\n    return cfg.igpt\n"
        "OBJECTIVES = {'igpt': _igpt}\n"
        "def load(values):\n    if values.objective == 'igpt':\n        pass\n"
    )
    assert [hit.split(": ")[1] for hit in objective_names_in(table, "x", table=True)] == ["'igpt'"]


def batch_keys_in(source: str) -> set[str]:
    """Keys read or written on a variable named ``batch``: ``batch["k"]``, ``batch.get("k")``, ``"k" in batch``."""
    keys = set()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name)
            and node.value.id == "batch"
            and isinstance(node.slice, ast.Constant)
        ):
            keys.add(node.slice.value)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "batch"
            and node.func.attr == "get"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            keys.add(node.args[0].value)
        elif (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Constant)
            and isinstance(node.ops[0], (ast.In, ast.NotIn))
            and isinstance(node.comparators[0], ast.Name)
            and node.comparators[0].id == "batch"
        ):
            keys.add(node.left.value)
    return keys


def test_every_batch_key_in_use_is_declared():
    used = {}
    for p in [*(ROOT / "mmssl").rglob("*.py"), *(ROOT / "tools").glob("*.py")]:
        for key in batch_keys_in(p.read_text()):
            used.setdefault(key, str(p.relative_to(ROOT)))
    undeclared = {k: where for k, where in used.items() if k not in BATCH_KEYS}
    assert not undeclared, f"batch keys not in objectives/base.py BATCH_KEYS: {undeclared}"
    assert {"image", "view1", "tokens", "json"} <= set(used)  # the walker finds real readers


def test_the_batch_key_walker_sees_all_three_forms():
    source = "x = batch['text']\ny = batch.get('tokens')\nif 'caption' not in batch: pass\nz = other['no']\n"
    assert batch_keys_in(source) == {"text", "tokens", "caption"}
