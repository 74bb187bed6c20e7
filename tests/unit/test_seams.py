"""The seams between the lifecycle, the providers and the workspaces hold: a new provider is a
module of launcher/providers/ plus a line in its registry, not an edit across the launcher."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from launcher import providers
from launcher.providers.base import Sweepable
from tests.helpers import ROOT

LAUNCHER = ROOT / "launcher"
# catalog.py reads SkyPilot's price catalogs, where `vast` is the name of SkyPilot's own cloud
# folder (v8/vast/vms.csv) with a memory column of its own meaning: a fact of that file format.
CATALOG_FORMAT = LAUNCHER / "catalog.py"


def code_words(path: Path, strings_only: bool = False) -> list[str]:
    """Every name, attribute, import and string literal of a module, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    words = []
    for node in ast.walk(tree):
        if strings_only and not isinstance(node, ast.Constant):
            continue
        if isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            words += [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.append(node.value)
    return words


def test_no_module_outside_the_providers_names_vast():
    outside = [p for p in LAUNCHER.rglob("*.py") if "providers" not in p.relative_to(LAUNCHER).parts
               and p != CATALOG_FORMAT]
    assert len(outside) > 10
    named = {str(p.relative_to(ROOT)): [w for w in code_words(p) if re.search("vast", w, re.I)] for p in outside}
    assert {path: words for path, words in named.items() if words} == {}


def test_the_lifecycle_holds_no_shell_command():
    shell = [w for w in code_words(LAUNCHER / "job.py", strings_only=True)
             if re.search(r"rsync|ssh |kill -|tail -F|setsid|nohup|mkdir|\bcd |&&", w)]
    assert shell == []
    tree = ast.parse((LAUNCHER / "job.py").read_text())
    imported = {name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for name in [getattr(node, "module", None) or "", *(a.name for a in node.names)]}
    assert not {"launcher.remote", "subprocess", "shlex", "launcher.providers.vast"} & imported


def test_what_can_rent_and_sweep_is_computed_from_the_registry():
    assert providers.rentable() == tuple(n for n, c in providers.PROVIDERS.items() if c.rents_machines)
    assert providers.sweepable() == tuple(n for n, c in providers.PROVIDERS.items() if issubclass(c, Sweepable))
    assert "local" not in providers.rentable() and "ssh" not in providers.rentable()


def test_each_providers_settings_are_a_section_of_resources():
    from launcher.config import Resources

    for name, model in providers.settings_models().items():
        assert Resources.model_fields[name].annotation is model
