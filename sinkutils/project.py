"""What the build's modules share, one floor below them: the project's root, its chapters and a profile's
parameters for each chapter (``profiles/<name>.yml``, checked against the chapters' ``parameters`` cells).

``book`` (the runner) calls ``preflight`` and ``scoreboard``; all three read these, so none imports another upward.
"""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def chapters(root: Path = ROOT) -> list[str]:
    """The chapters' names (``chapters/NN_*.ipynb``), in order."""
    return sorted(p.stem for p in (root / "chapters").glob("[0-9][0-9]_*.ipynb"))


def parameters(profile: str, chapter: str, root: Path = ROOT) -> dict:
    """The papermill parameters of ``chapter`` under ``profile`` (defaults, then the chapter's overrides)."""
    path = root / "profiles" / f"{profile}.yml"
    if not path.exists():
        known = sorted(p.stem for p in (root / "profiles").glob("*.yml"))
        raise ValueError(f"unknown profile {profile!r}; choose one of {known}")
    spec = _profile(path, root)
    return dict(spec.get("defaults") or {}) | dict((spec.get("chapters") or {}).get(chapter) or {})


def declared(chapter: str, root: Path = ROOT) -> set[str]:
    """The parameters a chapter's ``parameters`` cell assigns (what papermill can set)."""
    import papermill

    return set(papermill.inspect_notebook(str(root / "chapters" / f"{chapter}.ipynb")))


def _profile(path: Path, root: Path) -> dict:
    """A profile's YAML, checked: a misspelt key would otherwise be dropped and the chapter run with its default."""
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(spec, dict) or set(spec) - {"defaults", "chapters"}:
        raise ValueError(f"{path}: expected a mapping with the keys 'defaults' and 'chapters', got "
                         f"{sorted(spec) if isinstance(spec, dict) else type(spec).__name__}")
    known = chapters(root)
    entries = spec.get("chapters") or {}
    if set(entries) - set(known):
        raise ValueError(f"{path}: unknown chapters {sorted(set(entries) - set(known))} under 'chapters'; choose "
                         f"from {known}")
    for name, entry in entries.items():
        if set(entry or {}) - declared(name, root):
            raise ValueError(f"{path}: chapter {name} has no parameters {sorted(set(entry) - declared(name, root))}; "
                             f"its parameters are {sorted(declared(name, root))}")
    every = set().union(*(declared(name, root) for name in known))
    if set(spec.get("defaults") or {}) - every:
        raise ValueError(f"{path}: no chapter has the parameters {sorted(set(spec['defaults']) - every)} under "
                         f"'defaults'; the chapters' parameters are {sorted(every)}")
    return spec
