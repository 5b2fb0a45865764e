"""Using a trained model: the exported bundle, predictions and a hospital's own evaluation."""
