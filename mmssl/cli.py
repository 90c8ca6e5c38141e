"""Console scripts: ``mmssl TOOL [args]`` runs ``tools/TOOL.py`` (``mmssl --list`` names them), and
``mmssl-pretrain``, ``mmssl-export``, ... are shortcuts for the common ones (pyproject.toml ``[project.scripts]``).

The tools are plain scripts with a ``main(argv)``; they ship inside the package (``config/paths.py``: a symlink
in a checkout, copies in a wheel) and are loaded from their file, so ``python tools/pretrain.py ...`` in a
checkout and ``mmssl-pretrain ...`` after ``pip install`` run the same code. This module is the tools' layer
(DESIGN.md §3, L5): nothing in mmssl imports it.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from mmssl.config.paths import TOOLS_DIR

_running: str | None = None  # the module name of the tool run_tool is running


def is_program(module_name: str) -> bool:
    """Whether a tool module is the program being run (``python tools/X.py``, ``mmssl X``, ``mmssl-X``) rather
    than imported. Tools parse their arguments at the top when it is, so that ``--help`` and usage errors
    answer before their heavy imports (torch, Lightning, transformers: seconds each)."""
    return module_name in ("__main__", _running)


def tools() -> list[str]:
    return sorted(p.stem for p in TOOLS_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_tool(name: str) -> ModuleType:
    """``tools/NAME.py`` as the module ``mmssl.tools.NAME`` (registered in ``sys.modules``, so worker processes
    can unpickle its functions, as ``make_shards --workers`` needs)."""
    path = TOOLS_DIR / f"{name.replace('-', '_')}.py"
    if not path.is_file():
        raise SystemExit(f"mmssl: unknown tool {name!r}; tools: {', '.join(tools())}")
    spec = importlib.util.spec_from_file_location(f"mmssl.tools.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_tool(name: str, argv: list[str]) -> int:
    global _running
    sys.argv = [f"mmssl {name}", *argv]  # argparse's program name in usage lines (and is_program's arguments)
    _running = f"mmssl.tools.{name.replace('-', '_')}"
    module = load_tool(name)
    code = module.main(argv)
    return code if isinstance(code, int) else 0  # some tools return a report (make_shards: the manifest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print("usage: mmssl TOOL [args...]    (mmssl TOOL --help for a tool's options)")
        print(f"tools: {', '.join(tools())}")
        return 0 if argv else 2
    return run_tool(argv[0], argv[1:])


def _shortcut(name: str):
    def run() -> int:
        return run_tool(name, sys.argv[1:])

    run.__name__ = name
    return run


pretrain = _shortcut("pretrain")
export = _shortcut("export")
make_shards = _shortcut("make_shards")
linear_probe = _shortcut("linear_probe")
knn = _shortcut("knn")
zero_shot = _shortcut("zero_shot")
chat = _shortcut("chat")


if __name__ == "__main__":
    sys.exit(main())
