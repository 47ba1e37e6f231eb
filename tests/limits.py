"""Limits the tests give the notebooks they execute."""

#: seconds a chapter's kernel may sit silent (no CPU, no message) before the watchdog interrupts it, then retries the
#: chapter (``sinkutils.book``). The book's 180 s guards slow disks; the tests load small models, and a silent
#: kernel (seen once in a full run, ipykernel 7.4.0: idle in its event loop, the cell's reply never arrived) then
#: costs about two minutes instead of six.
STALL = 60.0
