"""Self-supervised objectives: plain ``nn.Module``s mapping a batch dict to a dict with a ``"loss"`` (see base.py)."""
