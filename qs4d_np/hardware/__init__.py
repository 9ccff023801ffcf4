"""Analog in-memory-computing hardware: crossbar simulation and cost metrics."""
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.crossbar import CrossbarArray, MVMStats, program
from qs4d_np.hardware.metrics import BitWidths, CostReport, SSMShape, cost_report, reductions, summary

__all__ = ["BitWidths", "CostReport", "CrossbarArray", "CrossbarConfig", "MVMStats", "SSMShape",
           "cost_report", "program", "reductions", "summary"]
