"""The one marker for errors whose message may leave a hospital.

An :class:`ExplainedError` is raised by fedfusion's own checks (configuration, ledger,
weight layout, SecAgg+ scheme, update limits) with a message fedfusion wrote, which
names settings, files of the deployment and public numbers, never a record. A hospital
sends such a message to the server as it is; of any other exception the server learns
only its type (``client/app/outbound.py``).
"""

from __future__ import annotations

__all__ = ["ExplainedError"]


class ExplainedError(Exception):
    """An error whose message fedfusion wrote and which quotes no patient record."""
