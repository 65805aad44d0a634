"""Lowest layer: artifact I/O, chunks, paths, provenance, errors, validation, device."""
