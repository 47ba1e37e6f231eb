"""Limits the tests give the notebooks they execute."""

#: seconds a chapter's kernel may sit silent (no CPU, no message) before the watchdog interrupts it, then retries the
#: chapter (``sinkutils.book``). The book's 180 s guards slow disks; the tests load small models, so a stall of any
#: other cause than the one ``book.bounded_shell_wait`` removed (a reply missed by the client) costs about two
#: minutes here instead of six.
STALL = 60.0
