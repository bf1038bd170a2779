"""Basin volume and wall shape by random probing: directions, radii, estimators, and the probe run."""
