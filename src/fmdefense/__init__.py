"""fmdefense: FM-Defense, adversarial-example detection and purification by feature manipulation."""

__version__ = "0.1.0"
