"""What runs around the ServerApp, for the operator: the ``fedfusion`` commands.

``cli`` (simulate, server, audit, certs) -> ``simulate`` (a local federation on Flower's
simulation engine), ``serve`` (a real deployment: SuperLink, registration, the run),
``certs`` (CA, server certificate, hospital keys) and ``audit`` (membership inference).
"""
