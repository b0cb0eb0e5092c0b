"""mta: a durable, multi-process SMTP relay."""

from __future__ import annotations

import os


def version() -> str:
    """This release's version: pyproject.toml's [project] version, read from the installed
    package's metadata (pip, pipx, a wheel, `pip install -e`); from a source tree that was
    never installed, from its pyproject.toml itself. One source of truth either way."""
    from importlib import metadata
    try:
        return metadata.version("mta")
    except metadata.PackageNotFoundError:
        pass
    import tomllib
    pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        with open(pyproject, "rb") as f:
            project = tomllib.load(f).get("project", {})
    except FileNotFoundError:
        return "unknown (not installed)"
    return str(project["version"]) if project.get("name") == "mta" else "unknown (not installed)"
