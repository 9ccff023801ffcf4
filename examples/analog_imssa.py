"""A trained recurrent-QAT model on simulated IMSSA crossbars: agreement with its digital forward.

1. Load a ``qs4d train`` run (e.g. ``--mode recurrent --all_quant 256``) and give its state and
   activation quantizers static ranges, calibrated on training digits (``train.ptq.static_ranges``:
   the same weights and grids, ``scale_mode="running"``), so that the digital
   recurrent forward no longer depends on the batch it runs in. A run trained with
   ``--scale_mode state=running act=running`` already has them.
2. Print how often its digital recurrent forward agrees with its float64 twin (the same model
   computing in float64): a perturbation far below a state step already flips some predictions
   of a quantized recurrence, which bounds what agreement the arrays can reach.
3. Convert it with ``hardware.to_analog`` under each crossbar configuration (calibrated on the
   first ``--calib`` training digits) and evaluate it on the test digits: accuracy, the digital
   recurrent accuracy, agreement (same prediction as the digital forward), overflowing samples;
   noisy configurations over ``--seeds`` seeds (mean and std). The noisy rows compare the two
   state updates (``CrossbarConfig.state_update``): "full" rows hold Abar, whose cell errors
   perturb |Abar| ~ 1 of slowly decaying modes; "increment" rows hold Abar - I.
4. Print a table and write the numbers as JSON (``--out``).

    python examples/analog_imssa.py --checkpoint runs/qat8r3 --out runs/qat8r3/analog.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any

import numpy as np

from qs4d_np.cli.common import load_model, positive_int
from qs4d_np.data.tasks import load_task
from qs4d_np.hardware import CrossbarConfig, evaluate_analog
from qs4d_np.io import atomic_write_json
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant.config import QuantConfig
from qs4d_np.train.ptq import static_ranges

# noise-free, calibrated, the state DAC on the model's state grid (the converters' fixed grid)
MATCHED = CrossbarConfig(dac_bits=8, adc_bits=10, noise_management="none", bound_management=False,
                         state_grid="model", calib_margin=1.25)
# the same, with the state rows holding Abar - I (the periphery adds the held state) and every row's
# weights scaled to the full conductance range: cell errors then scale with |Abar - I|, not |Abar| ~ 1
INCREMENT = dataclasses.replace(MATCHED, state_update="increment", weight_scaling="output")
CONFIGS: dict[str, tuple[CrossbarConfig, bool]] = {  # name -> (config, noisy: run several seeds)
    "8-bit DAC, 10-bit ADC, model state grid": (MATCHED, False),
    "8-bit DAC, 10-bit ADC, model state grid, margin 2": (dataclasses.replace(MATCHED, calib_margin=2.0), False),
    "8-bit DAC, 10-bit ADC, model state grid, margin 3": (dataclasses.replace(MATCHED, calib_margin=3.0), False),
    # 2^14 - 1 = 16,383 = 129 x 127 DAC codes: an 8-bit state's codes stay exact on the state lines,
    # so what is left between analog and digital is the converters' rounding of everything else
    "15-bit DAC, 16-bit ADC, model state grid": (dataclasses.replace(MATCHED, dac_bits=15, adc_bits=16), False),
    "7-bit DAC, 9-bit ADC (defaults), model state grid": (dataclasses.replace(MATCHED, dac_bits=7, adc_bits=9),
                                                          False),
    "7-bit DAC, 9-bit ADC, absmax + bound management": (CrossbarConfig(), False),
    "realistic (read noise 0.06, PCM programming noise)": (CrossbarConfig.realistic(), True),
    "realistic, model state grid": (CrossbarConfig.realistic(noise_management="none", state_grid="model",
                                                              calib_margin=1.25), True),
    "8/10 bits, model state grid, read noise 0.01": (dataclasses.replace(MATCHED, out_noise=0.01), True),
    "8/10 bits, model state grid, PCM programming noise": (dataclasses.replace(MATCHED, prog_noise=1.0), True),
    "increment update, per-row weights, 8/10 bits": (INCREMENT, False),
    "increment update, read noise 0.01": (dataclasses.replace(INCREMENT, out_noise=0.01), True),
    "increment update, PCM programming noise": (dataclasses.replace(INCREMENT, prog_noise=1.0), True),
    "increment update, realistic noise (read 0.06, PCM)": (dataclasses.replace(INCREMENT, out_noise=0.06,
                                                                               prog_noise=1.0), True),
}


def float64_twin(model: S4DModel) -> S4DModel:
    """The same model (weights, quantizers, ranges) computing in float64."""
    config = dict(model.config)
    config["dtype"] = np.float64
    if isinstance(config.get("quant"), dict):
        config["quant"] = QuantConfig.from_dict(config["quant"])
    twin = S4DModel(**config)
    twin.load_arrays(model.state_arrays(), source="the float32 model")
    return twin


def predictions(model: S4DModel, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Class predictions of the digital recurrent forward, batch by batch, in the model's dtype."""
    return np.concatenate([model.forward(x[i:i + batch_size].astype(model.dtype), mode="recurrent").argmax(-1)
                           for i in range(0, x.shape[0], batch_size)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="qs4d train run directory (a QAT or float model)")
    parser.add_argument("--calib", type=positive_int, default=256, help="training digits for the ranges")
    parser.add_argument("--limit-test", type=positive_int, default=None, help="first N test digits (default all)")
    parser.add_argument("--seeds", type=positive_int, default=5, help="seeds of the noisy configurations")
    parser.add_argument("--batch_size", type=positive_int, default=50)
    parser.add_argument("--only", default=None, metavar="TEXT",
                        help="run only the configurations whose name contains TEXT (e.g. realistic)")
    parser.add_argument("--out", default=None, help="write the results here (JSON)")
    args = parser.parse_args(argv)

    task = load_task("smnist")
    n_test = len(task.test) if args.limit_test is None else min(args.limit_test, len(task.test))
    x, y = task.test.batch(np.arange(n_test))
    calib, _ = task.train.batch(np.arange(min(args.calib, len(task.train))))
    model = static_ranges(load_model(args.checkpoint), (calib[i:i + args.batch_size]
                                                        for i in range(0, len(calib), args.batch_size)))
    # how far the digital model itself moves under a sub-step perturbation: float64 arithmetic
    same = float(np.mean(predictions(model, x, args.batch_size) == predictions(float64_twin(model), x,
                                                                                args.batch_size)))
    print(f"digital recurrent forward, float32 vs its float64 twin: {same:.3f} of the predictions agree")
    results: dict[str, Any] = {"checkpoint": args.checkpoint, "test_samples": n_test, "calib_samples": len(calib),
                               "digital_float64_agreement": same, "configs": {}}
    print(f"{'configuration':<52} | accuracy | digital | agreement | overflowed | s")
    for name, (cfg, noisy) in CONFIGS.items():
        if args.only is not None and args.only not in name:
            continue
        start = time.perf_counter()
        runs = [evaluate_analog(model, x, y, cfg, batch_size=args.batch_size, seed=seed, calib=calib)
                for seed in range(args.seeds if noisy else 1)]
        acc = np.array([r["accuracy"] for r in runs])
        agree = np.array([r["agreement"] for r in runs])
        over = np.array([r["overflowed"] for r in runs])
        entry = {"crossbar": cfg.to_dict(), "seeds": len(runs), "accuracy_mean": float(acc.mean()),
                 "accuracy_std": float(acc.std()), "agreement_mean": float(agree.mean()),
                 "agreement_std": float(agree.std()), "overflowed_mean": float(over.mean()),
                 "digital_accuracy": runs[0]["digital_accuracy"], "runs": runs}
        results["configs"][name] = entry
        spread = f" +- {acc.std():.3f}" if noisy else ""
        print(f"{name:<52} | {acc.mean():.3f}{spread} | {runs[0]['digital_accuracy']:.3f} | "
              f"{agree.mean():.3f} | {over.mean():.1f} | {time.perf_counter() - start:.0f}", flush=True)
    results["load_average_1_5_15"] = list(os.getloadavg())
    if args.out is not None:
        atomic_write_json(args.out, json.loads(json.dumps(results, default=float)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
