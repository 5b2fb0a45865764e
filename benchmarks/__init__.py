"""Measurements of speed, memory and utility (``make bench``); never installed."""
