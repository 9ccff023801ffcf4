"""Analog in-memory-computing hardware: crossbar simulation, the analog model, cost metrics."""
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.convert import analog_parts, calibrate, evaluate_analog, to_analog
from qs4d_np.hardware.crossbar import CrossbarArray, MVMStats, program
from qs4d_np.hardware.metrics import BitWidths, CostReport, SSMShape, cost_report, reductions, summary

__all__ = ["BitWidths", "CostReport", "CrossbarArray", "CrossbarConfig", "MVMStats", "SSMShape", "analog_parts",
           "calibrate", "cost_report", "evaluate_analog", "program", "reductions", "summary", "to_analog"]
