"""The bit-exact integer golden model (docs/integer_spec.md) and its test vectors."""
from qs4d_np.golden.compare import CompareReport, Mismatch, compare_dumps
from qs4d_np.golden.fixedpoint import IntFormat, requantize, round_shift, saturate
from qs4d_np.golden.layer import SPEC_VERSION, SSMCore, SSMCoreFormats, SSMCoreTrace
from qs4d_np.golden.multiplier import quantize_multiplier, shared_shift_multipliers, ssm_core_multipliers
from qs4d_np.golden.vectors import read_memh, read_ssm_vectors, write_memh, write_ssm_vectors

__all__ = ["CompareReport", "IntFormat", "Mismatch", "SPEC_VERSION", "SSMCore", "SSMCoreFormats",
           "SSMCoreTrace", "compare_dumps", "quantize_multiplier", "read_memh", "read_ssm_vectors",
           "requantize", "round_shift", "saturate", "shared_shift_multipliers", "ssm_core_multipliers",
           "write_memh", "write_ssm_vectors"]
