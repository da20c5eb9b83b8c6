"""Metrics: reconstruction quality, codebook statistics and the AR loss (gLoss)."""
