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
    module = load_tool(name)
    sys.argv = [f"mmssl {name}", *argv]  # argparse's program name in usage lines
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
