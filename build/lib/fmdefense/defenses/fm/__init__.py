"""FM-Defense engine: normal ranges, natural morphs, resistance, thresholds, purifier, detector."""
