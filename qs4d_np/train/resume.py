"""What a resume checks before it continues a run: the saved and the current run identity in the
form they are compared in (older checkpoints' spellings read as today's), and the values of the
saved ``last.json``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from qs4d_np.data.mnist import source_identity
from qs4d_np.io import json_get
from qs4d_np.quant.config import QuantConfig
from qs4d_np.train.checkpoint import CheckpointError


def comparable_identities(saved: dict[str, Any], current: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two run identities in the form they are compared in.

    A saved quantization config as ``QuantConfig.from_dict`` reads it (options added since
    default to what the run computed with); each parameter group's names in sorted order (the
    optimizer state is keyed by name). In ``run_info`` as ``qs4d train`` records it, a data
    source saved with an installation path is named as it is now (``source_identity``), and a
    run saved before the data's content hash was recorded is compared without it.
    """
    saved, current = (_normalized(identity) for identity in (saved, current))
    saved_task, current_task = (_task_info(identity) for identity in (saved, current))
    if saved_task is not None and current_task is not None:
        if isinstance(saved_task.get("source"), str):
            saved_task["source"] = source_identity(saved_task["source"])
        if "sha256" not in saved_task:
            current_task.pop("sha256", None)
    return saved, current


def _task_info(identity: dict[str, Any]) -> dict[str, Any] | None:
    run_info = identity.get("run_info")
    task = run_info.get("task") if isinstance(run_info, dict) else None
    return task if isinstance(task, dict) else None


def noise_rng_key(meta: dict[str, Any]) -> str:
    """The key of the noise generator's state under ``rng``: ``noise``, or ``weight_noise`` in a checkpoint
    written before the noise protocol was renamed."""
    rng = meta.get("rng")
    return "weight_noise" if isinstance(rng, dict) and "weight_noise" in rng and "noise" not in rng else "noise"


def _normalized(identity: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(identity))  # a deep copy: the caller's dicts are not touched
    train = out.get("train")
    if isinstance(train, dict) and train.get("weight_noise") == 0.0:  # a run from before the noise options
        del train["weight_noise"]
        train.update(noise=0.0, noise_protocol="qs4d", noise_targets=["A"], noise_eval=False)
    model_config = out.get("model_config")
    if isinstance(model_config, dict) and isinstance(model_config.get("quant"), dict):
        out["model_config"] = {**model_config, "quant": QuantConfig.from_dict(model_config["quant"]).to_dict()}
    if isinstance(out.get("param_groups"), list):
        out["param_groups"] = [{**g, "names": sorted(g["names"])} if isinstance(g, dict) and "names" in g else g
                               for g in out["param_groups"]]
    return out


def check_resume_meta(meta: dict[str, Any], source: Path, epochs: int,
                      generators: Mapping[tuple[str, ...], np.random.Generator]) -> None:
    """Refuse a ``last.json`` whose values cannot be what the trainer wrote, naming the key."""
    epoch = json_get(meta, ("epoch",), source, int)
    if not 0 <= epoch <= epochs:
        raise CheckpointError(f"{source}: key 'epoch' is {epoch}, expected a completed epoch 0..{epochs}")
    step = json_get(meta, ("optimizer", "step"), source, int)
    if step < 0:
        raise CheckpointError(f"{source}: key 'optimizer.step' is {step}, expected an integer >= 0")
    factor = json_get(meta, ("optimizer", "lr_factor"), source, float)
    if not math.isfinite(factor) or factor < 0:
        raise CheckpointError(f"{source}: key 'optimizer.lr_factor' is {factor}, expected a finite number >= 0")
    json_get(meta, ("best", "epoch"), source, int)
    json_get(meta, ("best", "val_acc"), source, float)
    history = json_get(meta, ("history",), source, list)
    if len(history) != epoch or not all(isinstance(r, dict) for r in history):
        raise CheckpointError(f"{source}: key 'history' holds {len(history)} entries, expected one record "
                              f"(an object) per completed epoch ({epoch})")
    saved_model_rngs = json_get(meta, ("rng", "model"), source, dict)
    for keys, generator in generators.items():
        if keys[:2] == ("rng", "model") and keys[2] not in saved_model_rngs:
            continue  # a generator set mismatch is reported with both sets by the caller
        kind = type(generator.bit_generator)
        state = json_get(meta, keys, source, dict)
        try:
            kind().state = state  # a scratch generator: validates without touching the run's
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{source}: key {'.'.join(keys)!r} is not a {kind.__name__} generator state "
                                  f"(bit_generator {state.get('bit_generator')!r}): {exc}") from None
