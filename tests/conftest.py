import os
import shutil
from collections import Counter

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Measure once per test session: the chapters' kernels (test_chapters) and this process share one store, so a
# chapter's SmolLM2 survey serves tests/real_model.py's claims and the other way round (keys hold the weights, ids,
# parameters and code: a hit is the same measurement). Quiet OpenMP threads while other processes run beside.
if "SINKBOOK_STORE" not in os.environ:
    os.environ["SINKBOOK_STORE"] = __import__("tempfile").mkdtemp(prefix="sinkbook-test-store-")
    __import__("atexit").register(shutil.rmtree, os.environ["SINKBOOK_STORE"], True)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: skips the machine decides, by the start of their reason, and what to do about them. Chromium and bubblewrap
#: are distribution packages (``bash run.sh test`` installs them where it can); CUDA is hardware.
MACHINE_SKIPS = {"needs chromium": "chromium", "needs bubblewrap": "bubblewrap", "needs CUDA": "CUDA"}


def skip_counts(reports) -> Counter:
    """Skipped test reports counted by what they need (``MACHINE_SKIPS``' values; 'other' for any other reason)."""
    counts = Counter()
    for rep in reports:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason.removeprefix("Skipped: ")
        counts[next((what for start, what in MACHINE_SKIPS.items() if reason.startswith(start)), "other")] += 1
    return counts


def pytest_terminal_summary(terminalreporter):
    """One line before pytest's own: the skips for want of a package apart from those for want of a GPU."""
    if terminalreporter.config.option.collectonly:
        return
    counts = skip_counts(terminalreporter.stats.get("skipped", []))
    wanted = counts["chromium"] + counts["bubblewrap"]
    line = (f"skipped for want of chromium/bubblewrap: {wanted} (chromium {counts['chromium']}, bubblewrap "
            f"{counts['bubblewrap']}); need CUDA: {counts['CUDA']}; other skips: {counts['other']}")
    missing = [p for p in ("chromium", "bubblewrap") if counts[p] and not (p == "bubblewrap" and shutil.which("bwrap"))]
    if missing:
        line += f". To run them: apt-get install {' '.join(missing)} (as root; bash run.sh test does it where it can)"
    if counts["bubblewrap"] and "bubblewrap" not in missing:
        line += ". bubblewrap is installed but cannot start a sandbox here: the skip's reason (-rs) says why"
    terminalreporter.write_line(line, yellow=bool(wanted))


#: the groups of minutes, longest first (the slowest tests of a full run). ``bash run.sh test`` hands groups to the
#: workers in collection order (``--no-loadscope-reorder``; xdist's default puts the groups with most tests first,
#: which started the single-test groups of minutes last, to run alone while the other workers had finished)
LONGEST_FIRST = ("test_chapters", "test_gpu_rehearsal", "grader-hostile", "gpu-rehearsal-other-models", "test_grader",
                 "test_assignments", "test_site", "test_packaged", "test_smollm2")


def group_of(item) -> str:
    marker = item.get_closest_marker("xdist_group")
    return marker.args[0] if marker else item.module.__name__.rpartition(".")[2]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """``bash run.sh test`` runs pytest-xdist workers with ``--dist loadgroup``: a test file's tests stay on one worker
    (its module fixtures are built once), except the few that take minutes and name a group of their own, so they
    run beside the rest of their file. The groups of minutes come first (``LONGEST_FIRST``)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group_of(item)))
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group_of(item), len(rank)))  # stable: the rest keep their order
