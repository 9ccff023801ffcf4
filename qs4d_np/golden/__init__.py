"""The bit-exact integer golden model (docs/integer_spec.md) and its test vectors.

Python API of the flow: ``from_model`` (trained S4DModel -> ``IntegerModel``),
``IntegerModel.run`` (int64 NumPy, streaming, traces) or ``run_fast`` (Numba,
the same integers), ``measure_agreement`` (vs the float64 twin and the QAT
model), ``export_bundle`` (manifest.json + .memh) and ``compare_dumps``.
"""
from qs4d_np.golden.agreement import measure_agreement
from qs4d_np.golden.bundle import dataset_codes, export_bundle
from qs4d_np.golden.compare import CompareReport, Mismatch, compare_dumps
from qs4d_np.golden.export import from_model
from qs4d_np.golden.fast import run_fast
from qs4d_np.golden.fixedpoint import IntFormat, requantize, round_shift, saturate
from qs4d_np.golden.layer import SPEC_VERSION, SSMCore, SSMCoreFormats, SSMCoreTrace
from qs4d_np.golden.model import IntegerModel, ModelTrace
from qs4d_np.golden.multiplier import quantize_multiplier, shared_shift_multipliers, ssm_core_multipliers
from qs4d_np.golden.vectors import read_memh, read_ssm_vectors, write_memh, write_ssm_vectors

__all__ = ["CompareReport", "IntFormat", "IntegerModel", "Mismatch", "ModelTrace", "SPEC_VERSION", "SSMCore",
           "SSMCoreFormats", "SSMCoreTrace", "compare_dumps", "dataset_codes", "export_bundle", "from_model",
           "measure_agreement", "quantize_multiplier", "read_memh", "read_ssm_vectors", "requantize",
           "round_shift", "run_fast", "saturate", "shared_shift_multipliers", "ssm_core_multipliers",
           "write_memh", "write_ssm_vectors"]
