"""What runs inside the coordinator's ServerApp: the rounds, aggregation and the run's record.

``server_app`` (the Flower entry) -> ``rounds`` (one round driver for plain and SecAgg+
rounds, and the short-round policy) -> ``strategy`` (plain FedAvg over hospitals) and
``secagg`` (FedAvg over SecAgg+ uploads), ``validation`` (what an update must be),
``store`` (checkpoints, metrics, resume), ``report`` (plots and report.md), ``grid``
(metering, faster reply polling) and ``flwr_compat`` (every patch of Flower internals).
"""
