"""Data curation with the models mmssl trains: score image-text samples (``scoring``), then keep the good ones
and drop duplicates (``selection``). ``hashing`` holds the model-free exact and perceptual image hashes."""
