"""The coordinator: the Flower ServerApp, aggregation, checkpoints and run reports."""
