"""Training stages on the shared Accelerate loop: one module per stage."""
