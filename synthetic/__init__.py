"""Synthetic data domains, shared by training (data to learn from) and evaluation (scenes to
score against): the captioned shapes the bundled model is trained on."""
