"""Imports flow one way (DESIGN.md §3). Walks the AST of every module, so a violation fails here."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEVELS = {
    "config": 0, "ops": 0, "linear": 0, "dist": 0, "optim": 0, "flops": 0, "launch": 0,
    "backbones": 1, "heads": 1, "losses": 1, "targets": 1, "sequence": 1, "attention": 1,
    "objectives": 2, "vlm": 2,
    "lit": 3, "callbacks": 3, "data": 3, "eval": 3, "checkpoints": 3, "export": 3, "interop": 3, "viz": 3,
    "throughput": 3, "loggers": 3,
    "factory": 4, "cli": 5,
}  # fmt: skip
NO_LIGHTNING = {
    "objectives",
    "targets",
    "vlm",
    "backbones",
    "sequence",
    "attention",
    "heads",
    "losses",
    "ops",
    "linear",
    "flops",
    "config",
    "launch",
    "dist",
    "optim",
}
DATA_MAY_NOT = {
    "backbones",
    "sequence",
    "attention",
    "heads",
    "objectives",
    "targets",
    "vlm",
    "lit",
    "callbacks",
    "eval",
    "checkpoints",
    "export",
    "viz",
    "factory",
}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "mmssl" and len(parts) > 1 else None


def test_imports_flow_one_way():
    problems = []
    for path in sorted((ROOT / "mmssl").rglob("*.py")):
        rel = path.relative_to(ROOT / "mmssl")
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        me = rel.parts[0].removesuffix(".py")
        for name in imports(path):
            other = top(name)
            if other is None:
                if me in NO_LIGHTNING and name.split(".")[0] in ("lightning", "pytorch_lightning"):
                    problems.append(f"{rel}: imports {name} (objectives/targets/vlm stay Lightning-free)")
                continue
            if other not in LEVELS:
                continue
            if LEVELS[other] > LEVELS[me] or (other in ("factory", "cli") and me != other and me != "cli"):
                problems.append(f"{rel} (L{LEVELS[me]}) imports {name} (L{LEVELS[other]})")
            if me == "lit" and other in ("objectives", "targets", "vlm"):
                problems.append(f"{rel}: lit must not know any objective ({name})")
            if me == "data" and other in DATA_MAY_NOT:
                problems.append(f"{rel}: data must not import model code ({name})")
    for path in sorted((ROOT / "mmssl").rglob("*.py")):
        if any(n.startswith("tools") for n in imports(path)):
            problems.append(f"{path.relative_to(ROOT)}: imports tools")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from mmssl.factory import build_objective\nimport lightning.pytorch as L\n")
    assert {"mmssl.factory", "lightning.pytorch"} <= imports(bad)
