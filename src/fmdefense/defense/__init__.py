"""FM-Defense: natural morphs, resistance, thresholds, purification and the detector."""
