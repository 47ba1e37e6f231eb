"""Paper claims that the shipped ``sinkbook-tiny`` does not reproduce.

Each such test keeps asserting the paper's direction and carries ``departs(...)``: an expected failure with the
measurement in its reason. It is strict, so the day a retrained model reproduces the claim the test fails and
the mark must go. The chapters print the same measurements and say the same thing.
"""
import pytest


def departs(measured: str):
    """Expected to fail by its assertion only: any other exception (a crash) fails the test."""
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=f"does not hold on sinkbook-tiny: {measured}")
