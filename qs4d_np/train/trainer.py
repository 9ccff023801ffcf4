"""The training loop: AdamW + per-epoch cosine, validation, checkpoints, exact resume.

Works with any model object exposing ``forward(x, training)``,
``backward(dlogits)``, ``.params`` / ``.grads`` (flat dicts sharing arrays),
``param_groups()`` and ``config`` (a quantized model's config holds its
quantization, so a resume with other widths is refused); per-module
``buffers`` dicts and ``np.random.Generator`` attributes are checkpointed too.

Per epoch: train over a seeded shuffle, evaluate on the validation set, save
``best`` when validation accuracy improves, save ``last``, rewrite the
``metrics.jsonl`` log. At the end the model is loaded with the best
validation weights, evaluated on the test set and, when it has a ``save(path)``
method (``S4DModel``), written in its own format as ``best_model``.

``fit(resume=True)`` continues from ``last``: parameters, buffers, optimizer
moments and step, every generator's state and the epoch counter come back,
so a run killed after any completed epoch ends with the same weights as an
uninterrupted run (bit for bit, same machine and library versions).

The run's hyperparameters are ``qs4d_np.train.config.TrainConfig``, an evaluation pass is
``qs4d_np.train.evaluate.evaluate_model``, and what a resume checks in the saved run is
``qs4d_np.train.resume``; ``TrainConfig`` and ``evaluate_model`` are importable from here too.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping

import numpy as np
from tqdm.auto import tqdm

from qs4d_np.core.checks import NonFiniteError, check_bool
from qs4d_np.core.loss import SoftmaxCrossEntropy
from qs4d_np.data.loader import BatchIterator, BatchSource
from qs4d_np.io import atomic_write_json, atomic_write_text, json_get, remove_stale_temps
from qs4d_np.train.checkpoint import (CheckpointError, checkpoint_exists, config_differences, load_checkpoint,
                                      model_buffers, model_generators, remove_stale_arrays, save_checkpoint,
                                      to_jsonable)
from qs4d_np.train.config import TrainConfig
from qs4d_np.train.evaluate import Totals, evaluate_model
from qs4d_np.train.optim import AdamW, GroupRule, clip_grad_norm, global_grad_norm
from qs4d_np.train.resume import check_resume_meta, comparable_identities, noise_rng_key
from qs4d_np.train.schedule import CosineSchedule

_NOISE_STREAM = 1  # second seed word of the noise-aware training generator


class TrainingDiverged(RuntimeError):
    """A non-finite loss, logit or gradient: training stopped, the last good checkpoint is kept."""


class Trainer:
    """Train ``model`` on ``train_data``, validate on ``val_data``, test on ``test_data``.

    Datasets are :class:`qs4d_np.data.SequenceDataset`-like (``len`` and
    ``batch(idx) -> (x, y)``). ``out_dir`` receives the checkpoints
    (``last``/``best``), ``metrics.jsonl`` and ``results.json``.
    ``run_info`` (e.g. dataset name and size) is stored and must match on resume.
    ``on_epoch_end(trainer, record)`` is called after each epoch's checkpoint.
    """

    def __init__(self, model: Any, train_data: BatchSource, val_data: BatchSource, config: TrainConfig,
                 out_dir: str | Path, *, test_data: BatchSource | None = None,
                 run_info: Mapping[str, Any] | None = None, progress: bool = True,
                 on_epoch_end: Callable[["Trainer", dict], None] | None = None) -> None:
        self.model = model
        self.config = config
        self.out_dir = Path(out_dir)
        self.loss_fn = SoftmaxCrossEntropy()
        self.optimizer = AdamW(model.params, model.param_groups(), lr=config.lr, weight_decay=config.weight_decay,
                               rule=GroupRule(ssm_lr_cap=config.ssm_lr_cap))
        self.schedule = CosineSchedule(config.epochs, config.warmup_epochs)
        self.train_batches = BatchIterator(train_data, config.batch_size, shuffle=True, seed=config.seed,
                                           drop_last=config.drop_last)
        # its own stream (not the shuffle's), saved with the checkpoints like the other generators
        self.noise_rng = np.random.default_rng([config.seed, _NOISE_STREAM])
        self.val_batches = BatchIterator(val_data, config.eval_batch_size)
        self.test_batches = None if test_data is None else BatchIterator(test_data, config.eval_batch_size)
        self.run_info = to_jsonable(dict(run_info or {}))
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        self.epoch = 0  # epochs completed
        self.best = {"epoch": -1, "val_acc": -1.0}
        self.history: list[dict[str, Any]] = []

    # -- identity of a run --------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        """Everything that must be equal for a resume to continue the same run."""
        return {
            "train": to_jsonable(self.config),
            "model_config": to_jsonable(getattr(self.model, "config", None)),
            "run_info": self.run_info,
            "data_sizes": {"train": len(self.train_batches.dataset), "val": len(self.val_batches.dataset),
                           "test": None if self.test_batches is None else len(self.test_batches.dataset)},
            "params": {k: [list(v.shape), str(v.dtype)] for k, v in self.model.params.items()},
            "param_groups": [{"names": g["names"], "ssm": g["ssm"], "lr": g["base_lr"],
                              "weight_decay": g["weight_decay"]} for g in self.optimizer.groups],
            "schedule": self.schedule.state(),
        }

    # -- checkpoints ---------------------------------------------------------
    def _model_arrays(self) -> dict[str, np.ndarray]:
        """The model's parameters and buffers as ``params/<name>``, ``buffers/<name>`` (shared arrays).

        The same keys as ``S4DModel.state_arrays()``, so a checkpoint's arrays
        without the ``optim/`` entries load with ``S4DModel.load_arrays``.
        """
        arrays = {f"params/{k}": v for k, v in self.model.params.items()}
        arrays.update({f"buffers/{k}": v for k, v in model_buffers(self.model).items()})
        return arrays

    def _save(self, tag: str) -> Path:
        bad = [k for k, v in self._model_arrays().items() if not np.isfinite(v).all()]
        if bad:
            last = self.out_dir / "last.json"
            kept = f"{last} (the previous epoch) is kept" if last.is_file() else "no checkpoint was written"
            raise TrainingDiverged(f"{', '.join(bad[:5])} hold NaN/inf after epoch {self.epoch}: not saving, "
                                   f"{kept}")
        meta = {
            "identity": self._identity(),
            "epoch": self.epoch,
            "optimizer": self.optimizer.state_meta(),
            "rng": {"train_batches": self.train_batches.rng_state(),
                    "noise": self.noise_rng.bit_generator.state,
                    "model": {k: g.bit_generator.state for k, g in model_generators(self.model).items()}},
            "best": self.best,
            "history": self.history,
        }
        arrays = self._model_arrays()
        arrays.update({f"optim/{k}": v for k, v in self.optimizer.state_arrays().items()})
        return save_checkpoint(self.out_dir, tag, self.epoch, arrays, meta)

    def _restore_arrays(self, arrays: Mapping[str, np.ndarray], source: str) -> None:
        targets = self._model_arrays()
        for key, target in targets.items():
            if key not in arrays:
                raise CheckpointError(f"{source} has no array {key!r}")
            if arrays[key].shape != target.shape or arrays[key].dtype != target.dtype:
                raise CheckpointError(f"{source}: {key!r} is {arrays[key].shape} {arrays[key].dtype}, "
                                      f"the model has {target.shape} {target.dtype}")
        for key, target in targets.items():
            np.copyto(target, arrays[key])  # in place: the optimizer holds these arrays

    def _resume(self) -> None:
        if not checkpoint_exists(self.out_dir, "last"):
            raise CheckpointError(f"cannot resume: no checkpoint 'last.json' in {self.out_dir}")
        arrays, meta = load_checkpoint(self.out_dir, "last")
        source = self.out_dir / "last.json"
        saved_identity = json_get(meta, ("identity",), source, dict)
        diffs = config_differences(*comparable_identities(saved_identity, self._identity()))
        if diffs:
            raise CheckpointError(f"cannot resume from {source}: the run differs from the "
                                  "checkpoint (nothing was written):\n  " + "\n  ".join(diffs))
        generators = model_generators(self.model)
        noise_key = noise_rng_key(meta)
        check_resume_meta(meta, source, self.config.epochs,
                          {("rng", "train_batches"): self.train_batches.rng, ("rng", noise_key): self.noise_rng,
                           **{("rng", "model", k): g for k, g in generators.items()}})
        if set(generators) != set(meta["rng"]["model"]):
            raise CheckpointError(f"cannot resume: the model's random generators {sorted(generators)} differ "
                                  f"from the checkpoint's {sorted(meta['rng']['model'])}")
        # every file the rest of the run reads is verified now, not after the remaining epochs
        if meta["best"]["epoch"] > 0:
            load_checkpoint(self.out_dir, "best")
        for tag in ("last", "best"):  # leftovers of a run killed mid-write or mid-cleanup
            if checkpoint_exists(self.out_dir, tag):
                remove_stale_arrays(self.out_dir, tag)
        remove_stale_temps(self.out_dir)
        self._restore_arrays(arrays, str(source))
        self.optimizer.load_state({k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")},
                                  meta["optimizer"])
        self.train_batches.set_rng_state(meta["rng"]["train_batches"])
        self.noise_rng.bit_generator.state = meta["rng"][noise_key]
        for key, gen in generators.items():
            gen.bit_generator.state = meta["rng"]["model"][key]
        self.epoch = meta["epoch"]
        self.best = meta["best"]
        self.history = meta["history"]
        self._write_metrics()  # a run killed after its last commit has not written this epoch's line yet

    # -- passes ----------------------------------------------------------------
    def _diverged(self, what: str, value: float, where: str) -> TrainingDiverged:
        return self._diverged_at(where, f"{what} = {value}")

    def _diverged_at(self, where: str, what: str) -> TrainingDiverged:
        last = self.out_dir / "last.json"
        kept = f"the last good checkpoint is {last} (epoch {self.epoch})" if last.is_file() else "no checkpoint yet"
        return TrainingDiverged(f"training diverged in epoch {self.epoch + 1}, {where}: {what}; "
                                f"stopped, {kept}. Lower the learning rate or set clip_norm.")

    def _check_params(self, where: str) -> None:
        """After an optimizer step: name the first parameter the update made non-finite."""
        for name, value in self.model.params.items():
            if not np.isfinite(value).all():
                bad = int(value.size - np.count_nonzero(np.isfinite(value)))
                raise self._diverged_at(where, f"the update made {bad} of {value.size} value(s) of parameter "
                                               f"{name} NaN/inf")

    def _check_logits(self, logits: np.ndarray, where: str) -> None:
        bad = int(np.size(logits) - np.count_nonzero(np.isfinite(logits)))
        if bad:
            raise self._diverged("count of non-finite logits", bad, where)

    def _noise(self) -> ContextManager[Any]:
        """The noise one forward (and its backward) runs under: ``transient_noise`` (``noise`` > 0) or none."""
        if self.config.noise == 0.0:
            return contextlib.nullcontext()
        from qs4d_np.hardware.noise import transient_noise  # hardware is only needed for noise-aware runs
        c = self.config
        return transient_noise(self.model, c.noise, self.noise_rng, c.noise_protocol, c.noise_targets)

    def _train_epoch(self) -> dict[str, Any]:
        self.optimizer.set_lr_factor(self.schedule.factor(self.epoch))
        totals, norms = Totals(), []
        bar = tqdm(total=len(self.train_batches), desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                   disable=not self.progress, leave=False)
        start = time.perf_counter()
        for step, (x, y) in enumerate(self.train_batches.epoch(), start=1):
            with self._noise():
                try:
                    logits = self.model.forward(x, training=True)
                except NonFiniteError as exc:
                    raise self._diverged_at(f"step {step}", str(exc)) from None
                self._check_logits(logits, f"step {step}")
                loss = self.loss_fn.forward(logits, y)
                if not math.isfinite(loss):
                    raise self._diverged("loss", loss, f"step {step}")
                self.model.backward(self.loss_fn.backward())
            grads = self.model.grads
            norm = (clip_grad_norm(grads, self.config.clip_norm) if self.config.clip_norm is not None
                    else global_grad_norm(grads))
            if not math.isfinite(norm):
                raise self._diverged("gradient norm", norm, f"step {step}")
            with np.errstate(over="ignore", invalid="ignore"):  # reported just below, naming the parameter
                self.optimizer.step(grads)
            self._check_params(f"step {step}")
            totals.add(loss, logits, y)
            norms.append(norm)
            bar.update(1)
            bar.set_postfix({"loss": f"{totals.mean_loss:.4f}", "acc": f"{totals.accuracy:.4f}",
                             "samples/s": f"{totals.count / (time.perf_counter() - start):.1f}"})
        bar.close()
        seconds = time.perf_counter() - start
        return {"train_loss": totals.mean_loss, "train_acc": totals.accuracy,
                "grad_norm_mean": float(np.mean(norms)), "lr": self.optimizer.group_lrs(),
                "train_seconds": seconds, "train_samples_per_s": totals.count / seconds}

    def evaluate(self, batches: BatchIterator, desc: str) -> dict[str, float]:
        """Mean loss and accuracy of the model (eval mode) over ``batches``; stops on non-finite logits."""
        try:
            with self._noise() if self.config.noise_eval else contextlib.nullcontext():
                result = evaluate_model(self.model, batches, desc=desc, progress=self.progress)
        except NonFiniteError as exc:  # a model that checks its own forward (S4DModel)
            raise self._diverged_at(f"{desc} evaluation", str(exc)) from None
        if result["nonfinite"]:
            raise self._diverged("count of non-finite logits", result["nonfinite"], f"{desc} evaluation")
        return {"loss": result["loss"], "acc": result["acc"]}

    # -- the run -----------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to ``config.epochs``; returns the results (best epoch, its validation and test scores)."""
        if check_bool("resume", resume):
            self._resume()
        elif checkpoint_exists(self.out_dir, "last"):
            raise CheckpointError(f"{self.out_dir} already holds a run (last.json); resume it or choose another "
                                  "output folder (nothing was overwritten)")
        while self.epoch < self.config.epochs:
            record = {"epoch": self.epoch + 1, **self._train_epoch()}
            val = self.evaluate(self.val_batches, "val")
            record.update(val_loss=val["loss"], val_acc=val["acc"])
            self.epoch += 1
            self.history.append(record)
            if val["acc"] > self.best["val_acc"]:
                self.best = {"epoch": self.epoch, "val_acc": val["acc"]}
                self._save("best")
            self._save("last")
            self._write_metrics()
            if self.progress:
                tqdm.write(f"epoch {self.epoch}/{self.config.epochs}: train loss {record['train_loss']:.4f} "
                           f"acc {record['train_acc']:.4f} | val loss {val['loss']:.4f} acc {val['acc']:.4f} | "
                           f"{record['train_samples_per_s']:.1f} samples/s")
            if self.on_epoch_end is not None:
                self.on_epoch_end(self, record)
        return self._finish()

    def _write_metrics(self) -> None:
        atomic_write_text(self.out_dir / "metrics.jsonl", "".join(_json_line(r) for r in self.history))

    def _finish(self) -> dict[str, Any]:
        arrays, _ = load_checkpoint(self.out_dir, "best")
        self._restore_arrays(arrays, str(self.out_dir / "best.json"))
        results = {"best_epoch": self.best["epoch"], "best_val_acc": self.best["val_acc"], "epochs": self.epoch}
        if self.test_batches is not None:
            test = self.evaluate(self.test_batches, "test")
            results.update(test_loss=test["loss"], test_acc=test["acc"])
        if callable(getattr(self.model, "save", None)):
            self.model.save(self.out_dir / "best_model")  # the model's own format, for PTQ and evaluation
        atomic_write_json(self.out_dir / "results.json", results)
        return results


def _json_line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True) + "\n"
