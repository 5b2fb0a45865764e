"""Privacy audits a hospital runs on this machine: measured, beside what is accounted.

- ``one_run``: the one-run audit (Steinke, Nasr and Jagielski, 2023) of a simulated
  federation: canaries at one hospital, an empirical lower bound on epsilon at 95%
  confidence beside the accounted epsilon, and controls it must flag. ``bound`` is its
  statistics, ``record_canaries`` its black-box canaries, ``report`` its table and files.
- ``inprocess``: the federation it trains, in one process, call for call: each
  hospital's own round code and the server's round arithmetic (``shared_model``).
- ``membership``: membership-inference attacks on a finished simulated run's model.

Reached only from ``fedfusion audit`` (``client/node/audit_cli.py``), the benchmarks and
the tests: nothing a hospital's SuperNode or ClientApp runs imports this package
(``tests/test_imports.py``), so the switches in ``client/dp`` that ``one_run`` turns
on (canaries, broken noise, broken clipping) are never on in a real federation.
"""
