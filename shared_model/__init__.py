"""What every site shares: config, model, tokenizer, data formats and training loops.

Framework-free: it imports torch, never flwr or opacus.
"""
