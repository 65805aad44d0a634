"""Training loops and checkpoints (safetensors + JSON)."""
