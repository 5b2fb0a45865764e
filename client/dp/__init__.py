"""The privacy core of a hospital: everything that decides, spends or records epsilon.

- ``policy``: the hospital's caps on what the server asks, and when it declines.
- ``accounting``: epsilon of a history of Gaussian releases; planning the noise.
- ``ledger``: every release, on disk, checksummed, never reset.
- ``planning``: the released record count, the round's sample rate, steps and noise.
- ``engine``: the Opacus wiring (Poisson loader, DP optimizer, accountant hook).
- ``release``: the training loss, released in the same Gaussian mechanism.
- ``bookkeeping``, ``secure_noise``: per-example clipping in one pass; CSPRNG noise.

Nothing outside this package (and the two SecAgg+ modules) touches Opacus; the one noise
drawn outside it (the record count's, in ``client/app/trainer.py``) comes from
``secure_noise`` here.
"""
