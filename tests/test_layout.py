"""The import layout of src/: every module imports on its own in a fresh interpreter (no import circle),
and every sub-package imports from src only what the "May import:" line of its `__init__.py` allows.

The rule is read from the docstrings, so a new package or a changed line is checked without touching this
file: "May import: src.errors, data, models (why)." allows the ground module src.errors and the sibling
packages src.data and src.models (third-party names such as mindspore are not checked); "May import
everything below it: ..." also allows every ground module (a top-level module of src that imports no
sub-package). A package may always import itself.
"""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def src_modules():
    return sorted(module_name(p) for p in SRC.rglob("*.py"))


def packages():
    return sorted(p.parent.name for p in SRC.glob("*/__init__.py"))


def is_package(name):
    return (SRC / name.removeprefix("src.")).is_dir()


def unit(name):
    """The layer an imported name belongs to: a sub-package (src.data) or a top-level module (src.errors)."""
    parts = name.split(".")
    if len(parts) > 1 and is_package(f"src.{parts[1]}"):
        return f"src.{parts[1]}"
    return ".".join(parts[:2])


def imports_of(path):
    """(line, imported module) of every import of src in a file, at any depth (lazy imports included)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .iresnet import ...
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base == "src":  # from src import runtime
                found += [(node.lineno, f"src.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return [(line, name) for line, name in found if name == "src" or name.startswith("src.")]


def ground_modules():
    """Top-level modules of src that import no sub-package: what "everything below it" includes."""
    ground = set()
    for path in SRC.glob("*.py"):
        if path.name != "__init__.py" and not any(is_package(unit(name)) for _, name in imports_of(path)):
            ground.add(module_name(path))
    return ground


def allowed_imports(package):
    """What src/<package>/__init__.py says the package may import, as units."""
    doc = ast.get_docstring(ast.parse((SRC / package / "__init__.py").read_text())) or ""
    match = re.search(r"May import([^:]*):(.*?)(?:\.\s|\.$|$)", " ".join(doc.split()))
    assert match, f"src/{package}/__init__.py: its docstring has no 'May import: ...' line"
    listed = re.sub(r"\([^)]*\)", "", match.group(2))
    allowed = {f"src.{package}"}
    for item in (word.strip() for word in listed.split(",")):
        if item.startswith("src."):
            allowed.add(item)
        elif item and is_package(f"src.{item}"):
            allowed.add(f"src.{item}")
    if "everything below it" in match.group(1):
        allowed |= ground_modules()
    return allowed


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    """Each module is imported first, with no other module of src loaded, so an import circle shows
    whichever module it is entered from (third-party libraries stay loaded, for speed)."""
    code = (
        "import importlib, json, sys, traceback\n"
        "failures = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    for loaded in [m for m in sys.modules if m == 'src' or m.startswith('src.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failures[name] = traceback.format_exception_only(exc)[-1].strip()\n"
        "print(json.dumps(failures))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(src_modules())], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failures, "modules that do not import on their own:\n" + "\n".join(
        f"  {name}: {error}" for name, error in failures.items())


def test_each_package_imports_only_what_its_init_allows():
    problems = []
    for package in packages():
        allowed = allowed_imports(package)
        for path in sorted((SRC / package).rglob("*.py")):
            for line, name in imports_of(path):
                target = unit(name)
                if target not in allowed:
                    problems.append(f"  {path.relative_to(ROOT)}:{line} imports {name}, but "
                                    f"src/{package}/__init__.py allows only {', '.join(sorted(allowed))}")
    assert not problems, "imports against the layout (fix the import, or the package's 'May import:' line):\n" \
        + "\n".join(problems)
