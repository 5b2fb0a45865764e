"""What runs inside the hospital's ClientApp: the message in, a local round, the reply out.

``client_app`` (the Flower entry, torch-free) -> ``handlers`` (request -> site -> local
round -> reply) -> ``trainer`` (the round, no Flower) with ``site`` (the hospital's data,
policy and ledger) and ``features`` (frozen-encoder features). ``secagg`` adapts Flower's
SecAgg+ mod; ``outbound`` guards every reply at the message boundary.
"""
