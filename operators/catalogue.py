"""What vetting needs to know of the installed diffusers, read from its source files.

Vetting a checkpoint asks three questions of diffusers: is `_class_name` one of its pipelines, which
components does that pipeline's constructor take, and does a component's library name one of its
pipeline modules (SD 1.5's `["stable_diffusion", "StableDiffusionSafetyChecker"]`). Importing
diffusers to answer them imports torch with it: about 4 s of CPU and 450 MiB on the driver, which
otherwise never touches torch, and again in `--dry-run`. The answers are in diffusers' source text,
so they are read from there: `ast` parses it without executing anything. Nothing here imports
diffusers. `tests/operators/test_catalogue.py` checks every answer against the imported classes, so a
diffusers upgrade that changes its layout fails there rather than vetting wrongly.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from pathlib import Path

# diffusers' top-level `_import_structure` names every public class as a string literal.
QUOTED_PIPELINE = re.compile(r'"([A-Za-z_][A-Za-z0-9_]*Pipeline)"')
CLASS_DEFINITION = re.compile(r"^class ([A-Za-z_][A-Za-z0-9_]*)\(", re.MULTILINE)


@functools.cache
def diffusers_root() -> Path:
    """The installed diffusers package directory (found without importing it)."""
    spec = importlib.util.find_spec("diffusers")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("diffusers is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def pipeline_names() -> frozenset[str]:
    """The pipeline classes diffusers exports (what `getattr(diffusers, name)` finds)."""
    return frozenset(QUOTED_PIPELINE.findall((diffusers_root() / "__init__.py").read_text(encoding="utf-8")))


@functools.cache
def pipeline_class_files() -> dict[str, tuple[Path, ...]]:
    """Every class defined under `diffusers/pipelines`, with the files that define it."""
    files: dict[str, list[Path]] = {}
    for path in sorted((diffusers_root() / "pipelines").rglob("*.py")):
        for name in CLASS_DEFINITION.findall(path.read_text(encoding="utf-8")):
            files.setdefault(name, []).append(path)
    return {name: tuple(paths) for name, paths in files.items()}


@functools.cache
def pipeline_modules() -> frozenset[str]:
    """The modules `diffusers.pipelines` exposes (its `_import_structure` keys, string literals)."""
    text = (diffusers_root() / "pipelines" / "__init__.py").read_text(encoding="utf-8")
    return frozenset(re.findall(r'"([a-z_][a-z0-9_]*)"', text))


def is_pipeline(name: str) -> bool:
    """Whether diffusers exports a pipeline class of this name."""
    return name.endswith("Pipeline") and name in pipeline_names()


@functools.cache
def pipeline_components(class_name: str) -> tuple[str, ...] | None:
    """The components a pipeline's constructor takes, as diffusers' `_get_signature_keys` lists them
    (parameters without a default, plus those in `_optional_components`); None when the class defines
    no constructor under `diffusers/pipelines` (modular pipelines, which restyle does not load)."""
    for path in pipeline_class_files().get(class_name, ()):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == class_name:
                return _constructor_components(node)
    return None


def _constructor_components(node: ast.ClassDef) -> tuple[str, ...] | None:
    constructor = None
    optional: list[str] = []
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            constructor = item
        targets = (
            item.targets if isinstance(item, ast.Assign) else [item.target] if isinstance(item, ast.AnnAssign) else []
        )
        if any(isinstance(target, ast.Name) and target.id == "_optional_components" for target in targets):
            try:
                optional = list(ast.literal_eval(item.value))
            except ValueError:  # not a literal: the signature cannot be read without running code
                return None
    if constructor is None:
        return None
    arguments = constructor.args
    positional = arguments.posonlyargs + arguments.args
    positional = positional[1:]  # self
    first_default = len(positional) - len(arguments.defaults)
    names = {argument.arg for argument in positional[:first_default]}
    names |= {argument.arg for argument in positional[first_default:] if argument.arg in optional}
    for argument, default in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True):
        if default is None or argument.arg in optional:
            names.add(argument.arg)
    return tuple(sorted(names))


def is_pipeline_module_class(library: str, class_name: str) -> bool:
    """Whether `library` is a diffusers pipeline module (`diffusers.pipelines.<library>`) that defines
    and exports the class `class_name`, as diffusers' loader resolves a `[library, class]` component."""
    if not library.isidentifier() or not class_name.isidentifier() or library not in pipeline_modules():
        return False
    package = diffusers_root() / "pipelines" / library
    initializer = package / "__init__.py"
    if not initializer.is_file() or f'"{class_name}"' not in initializer.read_text(encoding="utf-8"):
        return False
    return any(package in path.parents for path in pipeline_class_files().get(class_name, ()))
