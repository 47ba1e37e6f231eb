"""Full cpu-profile book build, timed per chapter and for the HTML, against the 10-minute target on 2 cores.

    python benchmarks/book_build.py            # same as `python -m sinkutils.book --profile cpu`, plus the verdict
"""
import sys

from sinkutils import book

TARGET_SECONDS = 600

if __name__ == "__main__":
    timings = book.main(["--profile", "cpu", *sys.argv[1:]])
    print(f"whole build {timings['total']:.0f} s = {timings['total'] / TARGET_SECONDS:.2f} x the "
          f"{TARGET_SECONDS} s target")
