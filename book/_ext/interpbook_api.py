"""``package-api``: the API reference of every public module of a package.

A ``missing-reference`` handler also resolves references to re-exported names
(``interpbook.Model`` -> ``interpbook.lm.Model``), so docstrings may use the short
public names that chapters use.

The directive lists the package's modules itself (``pkgutil``), so a module added to
``interpbook`` appears in the API reference without editing the page. Each module gets a
section with ``automodule`` of its documented members; modules named ``_private`` are
left out. Use it inside an ``{eval-rst}`` block: ``.. package-api:: interpbook``.
"""

from __future__ import annotations

import importlib
import pkgutil

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


def public_modules(package: str) -> list[str]:
    """``package`` and its public submodules, recursively, in alphabetical order."""
    pkg = importlib.import_module(package)
    subs = (m.name for m in pkgutil.walk_packages(pkg.__path__, package + "."))
    return [package, *sorted(n for n in subs if not any(p.startswith("_") for p in n.split(".")))]


class PackageAPI(SphinxDirective):
    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        lines: list[str] = []
        for name in public_modules(self.arguments[0]):
            lines += [name, "-" * len(name), "", f".. automodule:: {name}"]
            if name != self.arguments[0]:  # the package re-exports: document them once, at home
                lines.append("   :members:")
            lines.append("")
        container = nodes.section()
        nested_parse_with_titles(self.state, StringList(lines, source=self.get_source_info()[0]), container)
        return container.children


def resolve_reexport(app: Sphinx, env, node, contnode):
    """Retry a Python reference like ``interpbook.Model.run`` under the object's home
    module (``interpbook.lm.Model.run``); None leaves it unresolved."""
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("interpbook."):
        return None
    parts = target.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=2):
        obj = getattr(obj, part, None)
        home, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if home and qualname:
            canonical = ".".join([home, qualname, *parts[i:]])
            if canonical == target:
                return None
            return env.get_domain("py").resolve_xref(
                env, node["refdoc"], app.builder, node["reftype"], canonical, node, contnode
            )
    return None


def setup(app: Sphinx) -> dict:
    app.add_directive("package-api", PackageAPI)
    app.connect("missing-reference", resolve_reexport)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
