"""Generate the API reference (``docs/api.md``) from the docstrings.

    python -m pipeline.apidoc > docs/api.md

Every public module of ``compressor``, ``exporters``, ``runtime_tests`` (not the tests) and
``pipeline``: its docstring, then each public class and function defined there with its
signature and docstring.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys

PACKAGES = ("compressor", "exporters", "runtime_tests", "pipeline")
SKIP = ("pipeline.__main__", "pipeline.apidoc")


def modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
            short = info.name.rsplit(".", 1)[-1]
            if short.startswith(("test_", "_")) or info.name in SKIP:
                continue
            names.append(info.name)
    return sorted(names)


def _signature(obj) -> str:
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(…)"
    return re.sub(r" at 0x[0-9a-f]+", "", text)  # reprs of default functions: stable across runs


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def module_section(name: str) -> str:
    module = importlib.import_module(name)
    lines = [f"## `{name}`", "", _doc(module) or "(no module docstring)", ""]
    members = [(n, m) for n, m in vars(module).items()
               if not n.startswith("_") and (inspect.isclass(m) or inspect.isfunction(m))
               and getattr(m, "__module__", None) == name]
    for member_name, member in sorted(members):
        kind = "class" if inspect.isclass(member) else "def"
        lines += [f"### {kind} `{member_name}{_signature(member)}`", "", _doc(member) or "(no docstring)", ""]
    return "\n".join(lines)


def generate() -> str:
    body = [module_section(name) for name in modules()]
    return "# API reference\n\nGenerated from the docstrings by `python -m pipeline.apidoc`; do not edit.\n\n" + "\n".join(body)


if __name__ == "__main__":
    sys.stdout.write(generate())
