"""Training: AdamW with S4D parameter groups, the per-epoch schedule, checkpoints and the trainer."""
from qs4d_np.train.optim import AdamW, GroupRule, clip_grad_norm, global_grad_norm
from qs4d_np.train.schedule import CosineSchedule

__all__ = ["AdamW", "GroupRule", "CosineSchedule", "clip_grad_norm", "global_grad_norm"]
