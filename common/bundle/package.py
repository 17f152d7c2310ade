"""Package a bundle as a self-contained MONAI Model Zoo zip, and unpack one.

A bundle in this repository is configuration plus a model card; its Python lives in the shared package
``common``. A user who downloads a bundle has no ``common``, so :func:`package_bundle` vendors the code the
configs need into the bundle, following the Model Zoo convention: the code travels as the package
``<name>/scripts/`` and every ``common.`` reference, in the vendored code and in the packaged configs, is
rewritten to ``scripts.``. Only the import closure of what the configs name is vendored, so a bundle carries only
the code (and needs only the packages) it uses.

Zip layout (``<output_dir>/<name>_v<version>.zip``, version from ``configs/metadata.json``)::

    <name>/
        configs/          every config file of the bundle, made importable from any directory (below)
        docs/             model card, data licence, figures
        models/           model files up to ``max_file_mb`` (larger ones are listed in large_files.yml)
        scripts/          the vendored modules of `common` (with each package's __init__.py)
        LICENSE
        large_files.yml   Model Zoo format: ``large_files: [{path, url, hash_val, hash_type}, ...]``

Why the packaged configs differ from the repository's (:func:`package_config`): ``ConfigWorkflow.run`` puts the
bundle root on ``sys.path`` only when it starts ``run``, but MONAI evaluates the ``imports`` statements when the
config is first parsed and runs ``initialize`` before that, so ``"$from scripts.x import f"`` fails (silently,
through ``optional_import``) whenever the working directory is not the bundle root. In the packaged configs, each
``"$from common.x import f"`` therefore becomes a lazily located item ``"f": {"_target_": "scripts.x.f",
"_mode_": "callable"}``, every use of the bare name ``f`` in an expression becomes ``@f``, and ``initialize``
first puts ``@bundle_root`` on ``sys.path``. Run with ``--bundle_root <folder>``, a packaged bundle works from
any directory, with no ``common`` installed.

``large_files.yml`` comes from the bundle folder when it has one (weights published elsewhere, listed by path, url
and hash); the files it lists are never put in the zip, and a model file above ``max_file_mb`` that it does not
list is an error. The zip is reproducible: entries are sorted and carry a fixed timestamp, so packaging the
same files twice gives the same bytes (and hash).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import zipfile
from collections.abc import Iterable, Iterator
from typing import Any

from common.errors import DataError
from common.io import atomic_path

__all__ = [
    "bundle_version",
    "code_requirements",
    "config_modules",
    "distribution_names",
    "import_closure",
    "package_bundle",
    "package_config",
    "read_large_files",
    "rewrite_references",
    "unpack_bundle",
]

SOURCE_PACKAGE = "common"
VENDOR_PACKAGE = "scripts"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLES_ROOT = os.path.join(REPO_ROOT, "bundles")
SOURCE_ROOT = REPO_ROOT  # the folder holding the `common` package
LARGE_FILES = "large_files.yml"
MAX_FILE_MB = 20.0
MODELS_README = "models/README.md"
METADATA = "configs/metadata.json"
LOCAL_DATALIST = "configs/datalist.json"  # the configs' default datalist: made per user, never shipped
SHIPPED_FOLDERS = ("configs", "docs", "models")
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
#: the first ``initialize`` expression of a packaged config: what ``ConfigWorkflow.run`` does, done early enough
SYS_PATH_EXPRESSION = "$sys.path.insert(1, os.path.abspath(@bundle_root))"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can carry: reproducible archives
_HASH_TYPES = ("md5", "sha1", "sha256", "sha512")
# a dotted name in package `common` (not `uncommon.x`, not `obj.common.x`)
_MODULE_NAME = re.compile(rf"(?<![\w.])({SOURCE_PACKAGE}(?:\.[A-Za-z_]\w*)+)")
# a MONAI reference inside an expression, e.g. `@train#datalist` or `@network_def::features`
_REFERENCE = re.compile(r"@\w*(?:(?:#|::)\w*)*")


def rewrite_references(text: str, old: str = SOURCE_PACKAGE, new: str = VENDOR_PACKAGE) -> str:
    """Rewrite every reference to package ``old`` in ``text`` (code or a config string) to ``new``.

    ``common.data.x`` becomes ``scripts.data.x`` wherever it stands (imports, ``_target_`` strings, docstrings);
    ``from common import x`` and ``import common`` are rewritten as well. Names that merely contain the word
    (``uncommon.x``, ``obj.common.x``) are left alone.
    """
    text = re.sub(rf"(?<![\w.]){re.escape(old)}(?=\.[A-Za-z_])", new, text)
    text = re.sub(rf"^(\s*from\s+){re.escape(old)}(\s+import\b)", rf"\g<1>{new}\g<2>", text, flags=re.MULTILINE)
    return re.sub(rf"^(\s*import\s+){re.escape(old)}\b", rf"\g<1>{new}", text, flags=re.MULTILINE)


def package_config(content: dict[str, Any], path: str = "<config>", names: Iterable[str] = ()) -> dict[str, Any]:
    """The packaged form of one bundle config (see the module docstring for why it differs).

    - each ``"$from common.x import f [as g]"`` of ``imports`` is removed and ``g`` becomes a top-level item
      ``{"_target_": "scripts.x.f", "_mode_": "callable"}`` (listed right after ``imports``);
    - in every other ``$`` expression, the bare name ``g`` (for ``g`` imported so, in this config or in
      ``names``, the names the bundle's other configs import: a merged config such as ``evaluate.json`` relies on
      the items of ``train.json``) becomes the reference ``@g``;
    - ``initialize`` (when there is one) starts with :data:`SYS_PATH_EXPRESSION`, and ``imports`` gains
      ``$import os`` and ``$import sys`` for it;
    - then every remaining ``common.`` reference becomes ``scripts.``.

    Args:
        content: the parsed config (JSON or YAML); it is not modified.
        path: the config's file, named in errors.
        names: further names to turn into references (imported by the bundle's other configs).

    Raises:
        DataError: ``import common...`` (only ``from common.x import f`` can be made lazy), or an imported name
            that is already a top-level id of the config.
    """
    if not isinstance(content, dict):
        raise DataError(path, "a bundle config must be a mapping of ids to items")
    items: dict[str, dict[str, str]] = {}
    imports: list[Any] = []
    for statement in content.get("imports", []):
        parsed = _parse_common_import(statement, path)
        if parsed is None:
            imports.append(statement)
        else:
            items.update(parsed)
    clash = sorted(set(items) & set(content))
    if clash:
        raise DataError(path, f"imports {clash}, which are also ids of the config; rename the import with 'as'")
    # a name this config imports from elsewhere (MONAI, the standard library) stays that import
    own_names = {n for s in imports for n in _imported_aliases(s)}
    to_reference = set(items) | (set(names) - own_names)

    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, str):
            if value.startswith("$") and not _is_import_statement(value[1:]):
                value = "$" + _names_to_references(value[1:], to_reference, path)
            return rewrite_references(value)
        return value

    packaged: dict[str, Any] = {}
    for key, value in content.items():
        if key == "imports":
            packaged[key] = convert(imports)
            packaged.update({k: dict(v) for k, v in sorted(items.items())})
        else:
            packaged[key] = convert(value)
    if not packaged.get("imports") and items:
        packaged["imports"] = []
    if "initialize" in packaged:
        init = packaged["initialize"]
        packaged["initialize"] = [SYS_PATH_EXPRESSION, *(init if isinstance(init, list) else [init])]
        for module in ("os", "sys"):
            if f"$import {module}" not in packaged.setdefault("imports", []):
                packaged["imports"].append(f"$import {module}")
    return packaged


def config_files(bundle_dir: str) -> list[str]:
    """The bundle's config files (JSON and YAML), relative to ``bundle_dir``, sorted; a local datalist excluded."""
    return [
        rel for rel in _walk_files(bundle_dir, "configs") if rel.endswith(CONFIG_SUFFIXES) and rel != LOCAL_DATALIST
    ]


def config_modules(bundle_dir: str, source_root: str = SOURCE_ROOT) -> list[str]:
    """The modules of ``common`` the configs name (``_target_`` values, imports, expressions), sorted.

    A dotted name such as ``common.data.labels.ReorderChannelsd`` is resolved to its longest prefix that is a
    module or package under ``source_root`` (here ``common.data.labels``).

    Raises:
        DataError: a config names something of ``common`` that does not exist.
    """
    modules: set[str] = set()
    for rel in config_files(bundle_dir):
        if rel == METADATA:
            continue  # prose (description, references), not code
        path = os.path.join(bundle_dir, rel)
        for text in _config_strings(_read_config(path)):
            for dotted in _MODULE_NAME.findall(text):
                module = _resolve_module(dotted, source_root)
                if module is None:
                    raise DataError(path, f"names {dotted!r}, which is not a module of {SOURCE_PACKAGE}")
                modules.add(module)
    return sorted(modules)


def import_closure(modules: Iterable[str], source_root: str = SOURCE_ROOT) -> list[str]:
    """``modules`` plus every module of ``common`` they import, directly or not, and their packages; sorted.

    Every import statement of a module counts, also those inside functions (they run when the function does).
    Packages are listed by name and stand for their ``__init__.py``.
    """
    todo = list(modules)
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = _module_path(module, source_root)
        if path is None:
            raise DataError(module, f"is not a module of {SOURCE_PACKAGE} under {source_root}")
        seen.add(module)
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # the packages' __init__.py
        for name in _imported_names(path, module):
            if name.split(".")[0] == SOURCE_PACKAGE:
                resolved = _resolve_module(name, source_root)
                if resolved is None:
                    raise DataError(path, f"imports {name!r}, which is not a module of {SOURCE_PACKAGE}")
                todo.append(resolved)
    return sorted(seen)


def bundle_version(bundle_dir: str) -> str:
    """The ``version`` of ``configs/metadata.json``, which must be a key of its ``changelog``."""
    meta_path = os.path.join(bundle_dir, METADATA)
    meta = _read_json(meta_path)
    version = meta.get("version")
    if not isinstance(version, str) or not version:
        raise DataError(meta_path, "has no 'version' string")
    if version not in meta.get("changelog", {}):
        raise DataError(meta_path, f"version {version!r} is not listed in 'changelog'")
    return version


def read_large_files(bundle_dir: str) -> list[dict[str, str]]:
    """The entries of the bundle's own ``large_files.yml`` (empty if it has none), each checked.

    Every entry needs ``path``, ``url``, ``hash_val`` and ``hash_type`` (one of md5, sha1, sha256, sha512); when
    the file is present locally its hash must match ``hash_val``.
    """
    import yaml

    path = os.path.join(bundle_dir, LARGE_FILES)
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            content = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise DataError(path, f"is not valid YAML: {err}") from err
    entries = content.get("large_files", []) if isinstance(content, dict) else None
    if not isinstance(entries, list):
        raise DataError(path, "must hold a 'large_files' list")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(path, f"entry {i} must be a mapping with path, url, hash_val, hash_type")
        missing = [k for k in ("path", "url", "hash_val", "hash_type") if not isinstance(entry.get(k), str)]
        if missing:
            raise DataError(path, f"entry {i} lacks {missing} (each entry needs path, url, hash_val, hash_type)")
        if entry["hash_type"] not in _HASH_TYPES:
            raise DataError(path, f"entry {i}: hash_type must be one of {_HASH_TYPES}, got {entry['hash_type']!r}")
        local = os.path.join(bundle_dir, entry["path"])
        if os.path.isfile(local) and _file_hash(local, entry["hash_type"]) != entry["hash_val"].lower():
            raise DataError(local, f"its {entry['hash_type']} differs from hash_val in {LARGE_FILES}")
    return entries


def package_bundle(
    name: str, output_dir: str, bundles_root: str = BUNDLES_ROOT, max_file_mb: float = MAX_FILE_MB
) -> str:
    """Write ``<output_dir>/<name>_v<version>.zip``, the bundle in the Model Zoo layout with its code vendored.

    Args:
        name: the bundle's folder name under ``bundles_root`` (also the zip's top folder).
        output_dir: where the zip is written (created if needed); the zip appears complete or not at all.
        bundles_root: the folder holding the bundles (default: this repository's ``bundles/``).
        max_file_mb: model files above this size are not shipped; they must be listed in ``large_files.yml``.

    Returns:
        The path of the zip.

    Raises:
        DataError: no such bundle, metadata version not in its changelog, no LICENSE, a config that names a
            missing module of ``common`` or cannot be made lazy (:func:`package_config`), a large model file
            not listed in ``large_files.yml``.
    """
    if max_file_mb <= 0:
        raise ValueError(f"max_file_mb must be positive, got {max_file_mb}")
    bundle_dir = os.path.join(bundles_root, name)
    if not os.path.isdir(os.path.join(bundle_dir, "configs")):
        raise DataError(bundle_dir, "is not a bundle (no configs/ folder)")
    if not os.path.isfile(os.path.join(bundle_dir, "LICENSE")):
        raise DataError(bundle_dir, "has no LICENSE file")
    version = bundle_version(bundle_dir)
    modules = import_closure(config_modules(bundle_dir))
    large = read_large_files(bundle_dir)
    not_shipped = {os.path.normpath(entry["path"]) for entry in large}

    entries: dict[str, bytes] = _packaged_configs(bundle_dir)
    for folder in SHIPPED_FOLDERS:
        for rel in _walk_files(bundle_dir, folder):
            if rel in entries or os.path.normpath(rel) in not_shipped or rel == LOCAL_DATALIST:
                continue  # configs are already in (rewritten); a local datalist names the packager's own data
            path = os.path.join(bundle_dir, rel)
            size_mb = os.path.getsize(path) / 2**20
            if folder == "models" and size_mb > max_file_mb:
                raise DataError(
                    path,
                    f"is {size_mb:.1f} MB, above the {max_file_mb} MB shipped in a zip; publish it and list it "
                    f"(path, url, hash_val, hash_type) in {os.path.join(bundle_dir, LARGE_FILES)}",
                )
            with open(path, "rb") as f:
                entries[rel] = f.read()
    if not any(rel.startswith("models/") for rel in entries):
        # unzipping (MONAI's download included) skips empty folders; the Model Zoo layout wants models/ to exist
        entries[MODELS_README] = _models_readme(name, large).encode("utf-8")
    with open(os.path.join(bundle_dir, "LICENSE"), "rb") as f:
        entries["LICENSE"] = f.read()
    entries[LARGE_FILES] = _large_files_yaml(large)
    for module in modules:
        path = _module_path(module, SOURCE_ROOT)
        assert path is not None  # import_closure checked every module
        rel = os.path.relpath(path, SOURCE_ROOT).split(os.sep)
        rel[0] = VENDOR_PACKAGE
        with open(path, encoding="utf-8") as f:
            entries["/".join(rel)] = rewrite_references(f.read()).encode("utf-8")

    zip_path = os.path.join(output_dir, f"{name}_v{version}.zip")
    with atomic_path(zip_path) as tmp:
        _write_zip(tmp, name, entries, folders=SHIPPED_FOLDERS)
    return zip_path


def unpack_bundle(zip_path: str, dest_dir: str) -> str:
    """Extract a bundle zip into ``dest_dir`` and return the bundle folder ``<dest_dir>/<name>``.

    The zip must hold exactly one top folder with ``configs/metadata.json``, and no member may leave it (absolute
    paths or ``..``). An existing, non-empty ``<dest_dir>/<name>`` is an error rather than being mixed with.
    """
    if not zipfile.is_zipfile(zip_path):
        raise DataError(zip_path, "is not a zip file")
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        for member in names:
            parts = member.split("/")
            if member.startswith("/") or ".." in parts or "\\" in member or ":" in parts[0]:
                raise DataError(zip_path, f"member {member!r} would be written outside the bundle folder")
        tops = {n.split("/", 1)[0] for n in names}
        if len(tops) != 1:
            raise DataError(zip_path, f"must hold exactly one top folder, found {sorted(tops)}")
        top = tops.pop()
        if f"{top}/configs/metadata.json" not in names:
            raise DataError(zip_path, f"has no {top}/configs/metadata.json: not a bundle")
        bundle_dir = os.path.join(dest_dir, top)
        if os.path.isdir(bundle_dir) and os.listdir(bundle_dir):
            raise DataError(bundle_dir, "already exists and is not empty")
        os.makedirs(dest_dir, exist_ok=True)
        archive.extractall(dest_dir)
    return bundle_dir


def code_requirements(package_dir: str) -> dict[str, dict[str, list[str]]]:
    """The third-party top-level modules the Python files under ``package_dir`` import, by how they import them.

    Returns ``{"required": {module: [files]}, "optional": {module: [files]}}``: an import inside ``try`` with an
    ``except ImportError`` (or ``ModuleNotFoundError``) handler, and a module named in an ``optional_import("...")``
    call, are optional; every other import statement (module level or inside a function) is required. Standard
    library modules, ``__future__`` and the package itself (``package_dir``'s name) are left out.
    """
    own = os.path.basename(os.path.normpath(package_dir))
    found: dict[str, dict[str, list[str]]] = {"required": {}, "optional": {}}
    for root, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for filename in sorted(files):
            if not filename.endswith(".py"):
                continue
            path = os.path.join(root, filename)
            rel = os.path.relpath(path, os.path.dirname(os.path.normpath(package_dir))).replace(os.sep, "/")
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), filename=path)
            for module, optional in _third_party_imports(tree):
                if module == own or module in sys.stdlib_module_names or module == "__future__":
                    continue
                found["optional" if optional else "required"].setdefault(module, []).append(rel)
    for module in list(found["optional"]):
        if module in found["required"]:
            del found["optional"][module]
    return found


def distribution_names(modules: Iterable[str]) -> dict[str, str]:
    """Map import names to the installed distributions that provide them (``skimage`` -> ``scikit-image``).

    Names are normalised as pip compares them (lower case, ``-`` for runs of ``-_.``); a module that no installed
    distribution provides maps to its own normalised name.
    """
    from importlib.metadata import packages_distributions

    provided = packages_distributions()
    out = {}
    for module in modules:
        names = sorted({normalise_distribution(d) for d in provided.get(module, [module])})
        own = normalise_distribution(module)
        # `itk` is installed by the meta-distribution itk (itk-core, itk-io, ... hold the files): pin that one
        out[module] = own if own in names or _is_installed(own) else names[0]
    return out


def _is_installed(distribution: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(distribution)
    except PackageNotFoundError:
        return False
    return True


def normalise_distribution(name: str) -> str:
    """A distribution name as pip compares them: ``PyYAML`` -> ``pyyaml``, ``scikit_image`` -> ``scikit-image``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _packaged_configs(bundle_dir: str) -> dict[str, bytes]:
    """Every config file of the bundle in its packaged form (:func:`package_config`), by relative path."""
    contents = {rel: _read_config(os.path.join(bundle_dir, rel)) for rel in config_files(bundle_dir)}
    names: set[str] = set()
    for rel, content in contents.items():
        for statement in content.get("imports", []) if isinstance(content, dict) else []:
            names.update(_parse_common_import(statement, os.path.join(bundle_dir, rel)) or {})
    out = {}
    for rel, content in contents.items():
        packaged = package_config(content, os.path.join(bundle_dir, rel), names)
        if rel.endswith(".json"):
            out[rel] = (json.dumps(packaged, indent=4, ensure_ascii=False) + "\n").encode("utf-8")
        else:
            import yaml

            out[rel] = yaml.safe_dump(packaged, sort_keys=False, allow_unicode=True).encode("utf-8")
    return out


def _parse_common_import(statement: Any, path: str) -> dict[str, dict[str, str]] | None:
    """``{alias: callable item}`` for ``"$from common.x import f [as alias], ..."``; None for other statements."""
    if not (isinstance(statement, str) and statement.startswith("$") and _is_import_statement(statement[1:])):
        return None
    node = ast.parse(statement[1:].strip()).body[0]
    if isinstance(node, ast.Import):
        if any(alias.name.split(".")[0] == SOURCE_PACKAGE for alias in node.names):
            raise DataError(path, f"{statement!r}: write 'from {SOURCE_PACKAGE}.<module> import <name>' instead")
        return None
    assert isinstance(node, ast.ImportFrom)
    module = node.module or ""
    if node.level or module.split(".")[0] != SOURCE_PACKAGE:
        return None
    target = rewrite_references(module)
    return {
        alias.asname or alias.name: {"_target_": f"{target}.{alias.name}", "_mode_": "callable"} for alias in node.names
    }


def _imported_aliases(statement: Any) -> list[str]:
    """The names an import statement of a config's ``imports`` binds (``"$import a.b"`` binds ``a``)."""
    if not (isinstance(statement, str) and statement.startswith("$") and _is_import_statement(statement[1:])):
        return []
    node = ast.parse(statement[1:].strip()).body[0]
    if isinstance(node, ast.Import):
        return [alias.asname or alias.name.split(".")[0] for alias in node.names]
    return [alias.asname or alias.name for alias in node.names]  # type: ignore[union-attr]


def _is_import_statement(code: str) -> bool:
    try:
        body = ast.parse(code.strip()).body
    except SyntaxError:
        return False
    return len(body) == 1 and isinstance(body[0], (ast.Import, ast.ImportFrom))


def _names_to_references(code: str, names: set[str], path: str) -> str:
    """Replace each free use of a name in ``names`` in the Python expression ``code`` by the reference ``@name``.

    MONAI references (``@id``) are masked first (``#`` would read as a comment); attributes (``x.name``) and
    keyword names (``f(name=...)``) are left alone.
    """
    if not names or not any(n in code for n in names):
        return code
    masked: list[str] = []

    def mask(match: re.Match[str]) -> str:
        masked.append(match.group(0))
        return f"__ref{len(masked) - 1}__"

    text = _REFERENCE.sub(mask, code)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise DataError(path, f"expression {code!r} is not valid Python: {err.msg}") from err
    offset = len(text) - len(text.lstrip())
    lines = text.strip().encode("utf-8").split(b"\n")
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    hits = sorted(starts[n.lineno - 1] + n.col_offset for n in _free_names(tree, names, code, path))
    data = text.strip().encode("utf-8")
    for position in reversed(hits):  # from the end, so earlier offsets stay valid
        data = data[:position] + b"@" + data[position:]
    out = text[:offset] + data.decode("utf-8") + text[offset + len(text.strip()) :]
    return re.sub(r"__ref(\d+)__", lambda m: masked[int(m.group(1))], out)


def _free_names(tree: ast.AST, names: set[str], code: str, path: str) -> list[ast.Name]:
    """The ``ast.Name`` loads of ``names`` in ``tree``.

    The configs' expressions are calls (their logic lives in named functions of ``common``), so a name is never
    rebound inside one; an expression that binds one of ``names`` (a lambda argument, a comprehension variable)
    is refused rather than rewritten by Python's scoping rules.
    """
    bound = {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)}
    bound |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    if bound & names:
        raise DataError(
            path,
            f"expression {code!r} binds {sorted(bound & names)}, which the configs import; "
            "move the expression's logic into a function of common",
        )
    return [n for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in names]


def _third_party_imports(tree: ast.AST) -> Iterator[tuple[str, bool]]:
    """(top-level module, optional?) for every absolute import and ``optional_import("x")`` call in ``tree``."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for stmt in node.body:
                guarded.update(id(n) for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], id(node) in guarded
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], id(node) in guarded
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == "optional_import"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value.split(".")[0], True


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(getattr(n, "id", None) in ("ImportError", "ModuleNotFoundError") for n in names)


def _imported_names(path: str, module: str) -> Iterator[str]:
    """Absolute dotted names imported by the file ``path`` of ``module`` (relative imports resolved)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    package = module if os.path.basename(path) == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target
            # `from common.data import labels` imports a module by name: include it when it is one
            yield from (f"{target}.{alias.name}" for alias in node.names if alias.name != "*")


def _resolve_module(dotted: str, source_root: str) -> str | None:
    """The longest prefix of ``dotted`` that is a module or package under ``source_root``, else None."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if _module_path(candidate, source_root) is not None:
            return candidate
    return None


def _module_path(module: str, source_root: str) -> str | None:
    base = os.path.join(source_root, *module.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def _config_strings(content: Any) -> Iterator[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, dict):
        for key, value in content.items():
            yield str(key)
            yield from _config_strings(value)
    elif isinstance(content, list):
        for value in content:
            yield from _config_strings(value)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as err:
        raise DataError(path, "does not exist") from err
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(path, f"cannot be read as JSON: {err}") from err


def _read_config(path: str) -> Any:
    if path.endswith(".json"):
        return _read_json(path)
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        raise DataError(path, f"cannot be read as YAML: {err}") from err


def _walk_files(bundle_dir: str, folder: str) -> list[str]:
    """Files under ``bundle_dir/folder`` as sorted ``/``-separated relative paths; hidden files and caches skipped."""
    out = []
    for root, dirs, files in os.walk(os.path.join(bundle_dir, folder)):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for filename in files:
            if filename.startswith(".") or filename.endswith(".pyc"):
                continue
            out.append(os.path.relpath(os.path.join(root, filename), bundle_dir).replace(os.sep, "/"))
    return sorted(out)


def _file_hash(path: str, hash_type: str) -> str:
    digest = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _large_files_yaml(entries: list[dict[str, str]]) -> bytes:
    import yaml

    keys = ("path", "url", "hash_val", "hash_type")
    content = {"large_files": [{k: entry[k] for k in keys} for entry in entries]}
    return yaml.safe_dump(content, sort_keys=False, default_flow_style=False).encode("utf-8")


def _models_readme(name: str, large: list[dict[str, str]]) -> str:
    lines = [f"# {name}: model files", ""]
    if large:
        lines.append(
            f"The weights are published separately ({LARGE_FILES}); fetch them with "
            f"`python -m monai.bundle download_large_files --bundle_path <this bundle>`."
        )
    else:
        lines.append("No trained weights ship with this release; train them with `configs/train.json`.")
    lines.append("Inference reads `models/model.pt` (override with `--ckpt_path`).")
    return "\n".join(lines) + "\n"


def _write_zip(path: str, top: str, entries: dict[str, bytes], folders: Iterable[str]) -> None:
    """A reproducible zip: sorted entries, a fixed date, regular permissions, ``top/`` in front of every name."""
    with zipfile.ZipFile(path, "w") as archive:
        for folder in sorted({top, *(f"{top}/{f}" for f in folders)}):
            info = zipfile.ZipInfo(folder + "/", date_time=_ZIP_DATE)
            info.external_attr = (0o40755 << 16) | 0x10  # a directory entry: an empty models/ still exists
            archive.writestr(info, b"")
        for rel in sorted(entries):
            info = zipfile.ZipInfo(f"{top}/{rel}", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, entries[rel])
