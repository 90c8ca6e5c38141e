"""mmssl: multimodal self-supervised vision pretraining behind one small interface.

An objective is a plain ``nn.Module`` whose ``forward(batch: dict[str, Tensor])`` returns a dict with a
``"loss"``; see ``mmssl/objectives/base.py``.
"""

__version__ = "0.1.0"
