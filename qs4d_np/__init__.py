"""qs4d_np: quantization-aware training of S4D state-space models in NumPy/Numba."""
from qs4d_np.core.module import Module
from qs4d_np.ssm.s4d import S4D
from qs4d_np.models.s4d_model import S4DModel

__version__ = "0.1.0"

__all__ = ["Module", "S4D", "S4DModel", "__version__"]
