"""Attacks: Foolbox adapters (FGSM, DeepFool-L∞, CW-L2) and stored adversarial sets."""
