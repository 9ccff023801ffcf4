"""Core ops with hand-written backward passes (linear, activations, norms, dropout, pooling, loss)."""
