"""What runs inside a hospital: the Flower ClientApp, DP-SGD and the privacy ledger."""
