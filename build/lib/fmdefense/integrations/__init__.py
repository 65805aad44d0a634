"""Bridges to other libraries (ART); optional extras."""
