"""The layout rules of docs/architecture.md: no stdlib shadowing, queue/ is a folder."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = [ROOT / "mta", ROOT / "workers", ROOT / "queue" / "mtaqueue"]


def test_queue_is_a_folder_not_a_package() -> None:
    assert not (ROOT / "queue" / "__init__.py").exists()
    assert (ROOT / "queue" / "mtaqueue" / "__init__.py").exists()


def test_no_module_shadows_the_stdlib_or_a_dependency() -> None:
    reserved = set(sys.stdlib_module_names) | {"uvloop", "msgpack", "lmdb", "dns", "prometheus_client",
                                               "pytest", "hypothesis", "aiosmtpd"}
    offenders = []
    for root in SOURCE_ROOTS:
        for path in root.rglob("*.py"):
            if path.stem in reserved:
                offenders.append(str(path.relative_to(ROOT)))
        for folder in [p for p in root.rglob("*") if p.is_dir() and p.name != "__pycache__"]:
            if folder.name in reserved:
                offenders.append(str(folder.relative_to(ROOT)))
    top = [p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() or p.suffix == ".py"]
    offenders += [name for name in top if Path(name).stem in reserved and name != "tests"]
    assert offenders == []


def test_stdlib_queue_still_imports() -> None:
    import queue
    assert hasattr(queue, "SimpleQueue"), queue


def test_every_module_opens_with_a_docstring() -> None:
    missing = []
    for root in SOURCE_ROOTS:
        for path in root.rglob("*.py"):
            text = path.read_text()
            if path.name != "__main__.py" and not text.lstrip().startswith('"""'):
                missing.append(str(path.relative_to(ROOT)))
    assert missing == []
