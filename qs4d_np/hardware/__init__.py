"""Analog in-memory-computing hardware: crossbar simulation and cost metrics."""
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.crossbar import CrossbarArray, MVMStats, program

__all__ = ["CrossbarArray", "CrossbarConfig", "MVMStats", "program"]
