"""The full cpu-profile book build against issue 24's budgets on 2 cores: at most 6 minutes in all, no chapter over
90 s, the scoreboard step (it reads what the chapters stored) at most 15 s, a chapter's kernel under 3 GB of resident
memory. Exits 1 when a budget is missed.

    python benchmarks/book_build.py            # same as `python -m sinkutils.book --profile cpu`, plus the verdicts

Run it with nothing beside it, after `bash run.sh book` has installed everything (and built SmolLM2's float32 folder
once): on 2 cores a neighbour distorts every timing several-fold.
"""
import sys

from sinkutils import book

TOTAL, CHAPTER, SCOREBOARD, MEMORY = 360.0, 90.0, 15.0, 3 * 2 ** 30

if __name__ == "__main__":
    timings = book.main(["--profile", "cpu", *sys.argv[1:]])
    chapters = {k: v for k, v in timings.items() if k in book.chapters()}
    checks = [("whole build", timings["total"], TOTAL, "s"),
              ("slowest chapter " + max(chapters, key=chapters.get), max(chapters.values()), CHAPTER, "s"),
              ("scoreboard step", timings.get("scoreboard", 0.0), SCOREBOARD, "s")]
    peak = max(chapters, key=lambda k: book.PEAK_RSS.get(k, 0))
    checks.append((f"largest chapter kernel ({peak})", book.PEAK_RSS.get(peak, 0) / 2 ** 30, MEMORY / 2 ** 30, "GiB"))
    ok = True
    for what, got, budget, unit in checks:
        ok &= got <= budget
        print(f"{what:40s} {got:7.2f} {unit} = {got / budget:.2f} x the budget of {budget:g} {unit}: "
              f"{'met' if got <= budget else 'MISSED'}")
    sys.exit(0 if ok else 1)
