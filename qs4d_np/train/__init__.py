"""Training: AdamW with S4D parameter groups, the per-epoch schedule, checkpoints, the trainer, and
post-training quantization (``qs4d_np.train.ptq``; import it from there, as its function ``ptq`` would
hide the module if re-exported here)."""
from qs4d_np.train.checkpoint import CheckpointError, load_checkpoint, load_model_arrays, save_checkpoint
from qs4d_np.train.config import TrainConfig
from qs4d_np.train.evaluate import evaluate_model
from qs4d_np.train.optim import AdamW, GroupRule, clip_grad_norm, global_grad_norm
from qs4d_np.train.schedule import CosineSchedule
from qs4d_np.train.trainer import Trainer, TrainingDiverged

__all__ = ["AdamW", "CheckpointError", "CosineSchedule", "GroupRule", "TrainConfig", "Trainer", "TrainingDiverged",
           "clip_grad_norm", "evaluate_model", "global_grad_norm", "load_checkpoint", "load_model_arrays",
           "save_checkpoint"]
