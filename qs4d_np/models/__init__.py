"""The residual / norm block and ``S4DModel`` with its presets."""
