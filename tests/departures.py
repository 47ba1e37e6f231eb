"""Asserting a paper claim (``sinkutils.claims``) on the model under test: it holds, or it is a known departure.

``departs(request, claim)`` records a claim that the shipped default model does not reproduce: the test becomes a
strict expected failure whose reason is the claim's measurement (formatted from the measured values, never typed),
and only the claim's own assertion may fail it. A crash while measuring happens before the mark is set and fails
the test; a claim that starts to hold fails it too (XPASS strict), and the ``departs`` call must then become
``holds``. The chapters print the same ``claim.line()``.
"""
import pytest

from sinkutils.claims import Claim


def holds(claim: Claim) -> None:
    """Assert that ``claim`` holds, with its measurement as the message."""
    assert claim.holds, claim.line()


def departs(request: pytest.FixtureRequest, claim: Claim) -> None:
    """Mark the running test as the expected departure of ``claim`` (strict, AssertionError only), then assert it."""
    request.node.add_marker(pytest.mark.xfail(strict=True, raises=AssertionError,
                                              reason=f"{claim.key} does not hold on this model: {claim.summary}"))
    holds(claim)
