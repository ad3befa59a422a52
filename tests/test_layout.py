"""The package layout rules (issue 14), checked mechanically.

- Only the entry points and the config live at the package root; everything else is in a package
  named for what it holds.
- No two modules share a base name, so a name says where a module lives.
- Every `pep_torchrec/...` path and `pep_torchrec.x.y` module name the docs and the code mention exists,
  and the docs' module map names only files that exist.
- The tests mirror the package: each test folder is named for a package part (`tests/ops/` for
  `pep_torchrec/ops/`) or a top-level folder it tests (`tests/pipelines/`), and every `tests/...py` path
  the docs and the code mention exists.
"""

from __future__ import annotations

import itertools
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pep_torchrec"
ROOT_MODULES = {"__init__.py", "cli.py", "train.py", "config.py"}
DOCS = ["README.md", "docs/architecture.md"]
# Recorded history (research prototypes, benchmark results) names the paths of its day; it is not checked.
HISTORY = ("benchmarks/research/", "benchmarks/results/", "tests/assets/")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".sh", ""}
SCANNED = [
    "pep_torchrec",
    "tests",
    "benchmarks",
    "pipelines",
    "configs",
    "docs",
    ".ci",
    "README.md",
    "Makefile",
    "pyproject.toml",
]


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _tracked_text_files() -> list[Path]:
    """The sources and docs: git's tracked files under SCANNED (every file there without git)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", *SCANNED], cwd=ROOT, capture_output=True, text=True, check=True
        )
        files = [ROOT / name for name in out.stdout.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        files = [f for s in SCANNED for f in ([ROOT / s] if (ROOT / s).is_file() else (ROOT / s).rglob("*"))]
    return [
        f
        for f in files
        if f.is_file()
        and f.suffix in TEXT_SUFFIXES
        and f.resolve() != Path(__file__).resolve()  # this file's docstring shows the patterns
        and "__pycache__" not in f.parts
        and not str(f.relative_to(ROOT)).startswith(HISTORY)
    ]


def _expand_braces(path: str) -> list[str]:
    """`a/{b,c}.yaml` → [`a/b.yaml`, `a/c.yaml`] (shell brace expansion, one level)."""
    parts = re.split(r"\{([^{}]*)\}", path)
    literals, choices = parts[0::2], [group.split(",") for group in parts[1::2]]
    return [
        "".join(itertools.chain.from_iterable(itertools.zip_longest(literals, combo, fillvalue="")))
        for combo in itertools.product(*choices)
    ]


def test_package_root_holds_only_entry_points_and_config() -> None:
    at_root = {p.name for p in PACKAGE.glob("*.py")}
    assert at_root <= ROOT_MODULES, f"move into a package: {sorted(at_root - ROOT_MODULES)}"


def test_module_base_names_are_unique() -> None:
    by_name: dict[str, list[str]] = defaultdict(list)
    for path in _modules():
        if not (path.name.startswith("__") and path.name.endswith("__.py")):  # __init__, __main__
            by_name[path.name].append(str(path.relative_to(ROOT)))
    duplicates = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not duplicates, f"modules sharing a base name: {duplicates}"


@pytest.mark.parametrize("doc", DOCS)
def test_doc_paths_exist(doc: str) -> None:
    text = (ROOT / doc).read_text(encoding="utf-8")
    mentioned = {m.rstrip(".,:;") for m in re.findall(r"pep_torchrec/[\w./*{},-]*", text)}
    assert mentioned, f"{doc} names no pep_torchrec/ path"
    missing = []
    for path in sorted(mentioned):
        for candidate in _expand_braces(path):
            if not any(ROOT.glob(candidate)) and not (ROOT / candidate).exists():
                missing.append(candidate)
    assert not missing, f"{doc} names paths that do not exist: {missing}"


def test_module_map_names_existing_files() -> None:
    """Each row of architecture.md's module map: the files it names in backticks exist in its package."""
    text = (ROOT / "docs/architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(pep_torchrec/[\w/]*/)` \|(.*)\|$", text, flags=re.M)
    assert len(rows) >= 8, "the module map lost its package rows"
    missing = []
    for package, description in rows:
        for name in re.findall(r"`([\w*]+\.(?:py|cpp))`", description):
            if not any((ROOT / package).glob(name)):
                missing.append(f"{package}{name}")
    assert not missing, f"the module map names files that do not exist: {missing}"


def test_code_and_docs_name_existing_modules() -> None:
    """`pep_torchrec.a.b(.attr)` and `pep_torchrec/a/b.py` anywhere in the tracked sources and docs resolve:
    each dotted part is a module or package, or a name its module defines."""
    bad = []
    for file in _tracked_text_files():
        text = file.read_text(encoding="utf-8", errors="replace")
        where = file.relative_to(ROOT)
        for dotted in set(re.findall(r"(?<![\w.:])pep_torchrec(?:\.\w+)+", text)):
            parts, path = dotted.split(".")[1:], PACKAGE
            for i, part in enumerate(parts):
                if (path / part).is_dir():
                    path = path / part
                elif (path / f"{part}.py").is_file():
                    path = path / f"{part}.py"
                else:
                    source = path / "__init__.py" if path.is_dir() else path
                    if not re.search(rf"\b{re.escape(part)}\b", source.read_text(encoding="utf-8")):
                        bad.append(f"{where}: {dotted}")
                    break
                if path.is_file() and i + 1 < len(parts):  # the rest are attributes of this module
                    if not re.search(rf"\b{re.escape(parts[i + 1])}\b", path.read_text(encoding="utf-8")):
                        bad.append(f"{where}: {dotted}")
                    break
        for slashed in set(re.findall(r"pep_torchrec/[\w/]+\.py\b", text)):
            if not (ROOT / slashed).is_file():
                bad.append(f"{where}: {slashed}")
    assert not bad, "references to modules that do not exist:\n" + "\n".join(sorted(bad))


def test_short_module_paths_exist() -> None:
    """A path written from inside the package (`data/raw/spec_reader.py`, `distributed/planning.py`)
    names a file of the package (or, after `cf.`, of the installed TorchRec)."""
    import torchrec

    torchrec_root = Path(torchrec.__file__).parent
    parts = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    alternatives = "|".join(parts)
    pattern = re.compile(rf"(?<![\w/.-])((?:{alternatives})/[\w/]*\w\.(?:py|cpp))\b")
    bad = []
    for file in _tracked_text_files():
        for path in set(pattern.findall(file.read_text(encoding="utf-8", errors="replace"))):
            homes = (PACKAGE / path, ROOT / path, file.parent / path, torchrec_root / path)
            if not any(home.is_file() for home in homes) and not any(PACKAGE.glob(f"*/{path}")):
                bad.append(f"{file.relative_to(ROOT)}: {path}")
    assert not bad, "paths to modules that do not exist:\n" + "\n".join(sorted(bad))


def test_no_reference_to_documents_outside_the_repository() -> None:
    """The team's working documents (DESIGN.md, STYLE.md) live outside the repository: code and docs
    cite docs/architecture.md, which a fresh clone has."""
    bad = [
        f"{file.relative_to(ROOT)}: {name}"
        for file in _tracked_text_files()
        for name in sorted(set(re.findall(r"\b(?:DESIGN|STYLE)\.md\b", file.read_text(encoding="utf-8"))))
    ]
    assert not bad, "references to documents a clone does not have:\n" + "\n".join(bad)


def test_test_folders_mirror_the_package() -> None:
    tests = ROOT / "tests"
    folders = {p.parent for p in tests.rglob("test_*.py") if p.parent != tests}
    stray = sorted(
        str(f.relative_to(ROOT))
        for f in folders
        if not (PACKAGE / f.relative_to(tests)).is_dir() and not (ROOT / f.relative_to(tests)).is_dir()
    )
    assert not stray, f"test folders that name no package part: {stray}"


def test_code_and_docs_name_existing_tests() -> None:
    bad = []
    for file in _tracked_text_files():
        text = file.read_text(encoding="utf-8", errors="replace")
        for path in set(re.findall(r"(?<![\w/.])tests/[\w/]+\.py\b", text)):
            if not (ROOT / path).is_file():
                bad.append(f"{file.relative_to(ROOT)}: {path}")
    assert not bad, "references to test files that do not exist:\n" + "\n".join(sorted(bad))
