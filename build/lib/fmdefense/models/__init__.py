"""Networks: the protected classifiers and the combo-VAE."""
