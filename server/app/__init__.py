"""What runs inside the coordinator's ServerApp: the rounds, aggregation and the run's record.

``server_app`` (the Flower entry) -> ``strategy`` (plain FedAvg over hospitals) and
``secagg`` (FedAvg over SecAgg+ uploads), ``validation`` (what an update must be),
``store`` (checkpoints, metrics, resume), ``report`` (plots and report.md) and ``grid``
(metering, faster object pulls).
"""
