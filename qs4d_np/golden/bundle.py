"""Whole-model test vectors: ``manifest.json`` and one ``.memh`` file per tensor (docs/integer_spec.md, section 7).

``export_bundle(model, x, out_dir)`` runs the integer model on int inputs x
(K, L, d_in) with traces and writes

* ``weights/<part>.<name>.memh``: every integer parameter (weights, biases,
  multipliers, shifts, offsets, signs, the sigmoid table);
* ``inputs/x.memh``: the input codes;
* ``expected/layers.<i>.<tensor>.memh`` (and ``sat_<tensor>``): every traced
  tensor per sample and step, then ``expected/pooled.memh``,
  ``expected/avg.memh``, ``expected/logits.memh``, ``expected/predictions.memh``;
* ``manifest.json``: spec version; per tensor its shape, width, signedness,
  file, axes, layer, kind (weight / input / output) and, where it has one, its
  real step (``scale``: real value = scale * word) and the multiplier and
  shift words that requantize into it; the saturation counts and the local
  agreement bounds (eps) of section 6; per layer H, N2 and, when the export
  dropped modes with C = 0, ``N2_original`` and ``modes_kept`` (per channel
  the original indices of its modes, the rest of its N2 being inert padding).

The directory is written as a whole (``vectors.staged_export``): a
re-export replaces a previous one only once complete, and a non-empty
directory that is not a previous export (or holds other files too) is refused.

An RTL run writes its dump with the same relative file names (only the
``output`` tensors are compared) and ``compare_dumps(out_dir, dump_dir)``
reports every differing word.
"""
from __future__ import annotations

import os
from dataclasses import astuple
from pathlib import Path

import numpy as np

from qs4d_np.golden.fixedpoint import IntFormat, bits_needed
from qs4d_np.golden.layer import SPEC_VERSION
from qs4d_np.golden.model import LAYER_TENSORS, ROUNDED, IntegerModel
from qs4d_np.golden.vectors import MULT_WIDTH, SHIFT_WIDTH, staged_export, write_memh
from qs4d_np.io import atomic_write_json

AXES_STATE = ["sample", "step", "channel", "mode"]
AXES_SEQ = ["sample", "step", "channel"]
STRESS_DIR = "stress"


# Biases and offsets: 64-bit words whatever their values (the headroom rule keeps them below 2**63),
# so a design's port widths do not change from one export to the next.
BIAS_WIDTH = 64
SIGN_WIDTH = 2  # post_sign: +1 is 01, -1 is 11 (two's complement)


def _is_multiplier(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith("m_") or "_m" in leaf and leaf.split("_m")[-1].isdigit()


def _word_width(name: str, sig_bits: int) -> tuple[int, bool]:
    """Width and signedness of an integer parameter word by its role (fixed per role)."""
    leaf = name.rsplit(".", 1)[-1]
    if _is_multiplier(leaf):
        return MULT_WIDTH, True
    if leaf.startswith("r_") or leaf.endswith("_r"):
        return SHIFT_WIDTH, True
    if leaf == "sig_lut":
        return sig_bits + 1, False  # 0 .. 2**F
    if leaf.endswith("_sign"):
        return SIGN_WIDTH, True
    if leaf.endswith(("_b", "_offset")):
        return BIAS_WIDTH, True
    raise ValueError(f"no word width rule for parameter {name!r}")


def accumulator_bits(model: IntegerModel) -> dict[str, int]:
    """Per rounding site, the signed bits its exact accumulator can need (the headroom bound of
    docs/integer_spec.md 2.3 over every channel, from the grids and the actual multipliers)."""
    def bits(bounds, mults, offset=None) -> int:
        worst = sum(np.asarray(m).astype(object) * int(b) for b, m in zip(bounds, mults))
        if offset is not None:
            worst = worst + np.abs(offset).astype(object)
        return int(np.max(worst)).bit_length() + 1

    def requant(rq) -> int:
        return bits(rq.bounds, rq.M, rq.offset)

    out = {"layers.0.u": requant(model.encoder.requant)}
    for i, lay in enumerate(model.layers):
        c, f = lay.core, lay.core.formats
        ax, bu = f.Abar.maxabs * f.x.maxabs, f.Bbar.maxabs * f.u.maxabs
        cx = c.N2 * f.C.maxabs * f.x.maxabs
        p = f"layers.{i}."
        out[p + "x_re"] = bits([ax, ax, bu], [c.m_a_re, c.m_a_im_to_re, c.m_b_re])
        out[p + "x_im"] = bits([ax, ax, bu], [c.m_a_re, c.m_a_im_to_im, c.m_b_im])
        out[p + "y"] = bits([cx, cx, f.D.maxabs * f.u.maxabs], [c.m_c_re, c.m_c_im, c.m_d])
        out[p + "za"], out[p + "zb"] = requant(lay.mix_a.requant), requant(lay.mix_b.requant)
        out[p + "act"] = requant(lay.glu)
        if lay.post is not None:
            out[p + "out"] = requant(lay.post)
    out["avg"], out["logits"] = requant(model.pool), requant(model.decoder.requant)
    return out


def _layer_formats(model: IntegerModel, i: int) -> dict[str, IntFormat]:
    lay = model.layers[i]
    f = lay.core.formats
    return {"u": f.u, "x_re": f.x, "x_im": f.x, "y": f.y, "za": lay.mix_a.requant.fmt,
            "zb": lay.mix_b.requant.fmt, "sig": IntFormat(lay.sig_bits + 2, 0, 1 << lay.sig_bits),
            "act": lay.glu.fmt, "out": lay.out_fmt}


def _weight_formats(model: IntegerModel) -> dict[str, IntFormat]:
    """The grid format of every weight word that has one (others get the width they need)."""
    out = {"encoder.encoder_W": model.encoder.w_fmt, "decoder.decoder_W": model.decoder.w_fmt}
    for i, lay in enumerate(model.layers):
        f = lay.core.formats
        for name, fmt in (("Abar_re", f.Abar), ("Abar_im", f.Abar), ("Bbar_re", f.Bbar), ("Bbar_im", f.Bbar),
                          ("C_re", f.C), ("C_im", f.C), ("D", f.D), ("mix_a_W", lay.mix_a.w_fmt),
                          ("mix_b_W", lay.mix_b.w_fmt)):
            out[f"layers.{i}.{name}"] = fmt
    return out


def export_bundle(model: IntegerModel, x: np.ndarray, out_dir: str | os.PathLike,
                  labels: np.ndarray | None = None, *, stress: int = 0, stress_seed: int = 0,
                  trace_acc: bool = False) -> dict:
    """Write the vector directory for int inputs ``x`` (K, L, d_in); return the manifest.

    ``stress`` > 0 adds a stress bundle in ``out_dir/stress`` (``golden.stress``: a synthetic model of
    this model's shape, widths and grids with ``stress`` samples whose words show exact ties of both
    parities and clamps to both rails at every rounding site). ``trace_acc`` also writes every rounded
    tensor's accumulator before rounding (``expected/<tensor>.acc.memh``, 64-bit, kind ``trace``: not
    compared). The manifest's ``events`` counts, per rounding site, ``ties_even``, ``ties_odd``,
    ``sat_low`` and ``sat_high`` (``fixedpoint.rounding_events``); ``warnings`` names every site
    without a tie or without a clamp (a trained model's vectors have none: use ``stress``).
    """
    from qs4d_np.golden.stress import stress_case

    run = model.run(x, trace_acc=True)
    stress_parts = None
    if stress:
        s_model, s_x, _ = stress_case(model, stress, seed=stress_seed)
        stress_parts = (s_model, s_x, s_model.run(s_x, trace_acc=True))
    with staged_export(out_dir) as staged:
        manifest = _write_bundle(model, x, run, staged, labels, trace_acc, write=stress_parts is None)
        if stress_parts is not None:
            sub = _write_bundle(*stress_parts, staged / STRESS_DIR, None, trace_acc, write=True)
            sub["kind"] = "stress"
            manifest["stress"] = {"dir": STRESS_DIR, "samples": sub["samples"], "warnings": sub["warnings"],
                                  "files": [f"{STRESS_DIR}/{f}" for f in _bundle_files(sub)]}
            atomic_write_json(staged / STRESS_DIR / "manifest.json", sub)
            atomic_write_json(staged / "manifest.json", manifest)
        return manifest


def _bundle_files(manifest: dict) -> list[str]:
    return ["manifest.json"] + [spec["file"] for spec in manifest["tensors"].values()]


def _warnings(events: dict[str, dict[str, int]]) -> list[str]:
    """One line per rounding site whose words never show the tie rule or a clamp."""
    out = []
    for site, ev in events.items():
        lacks = [k for k in ("ties_even", "ties_odd", "sat_low", "sat_high") if ev[k] == 0]
        if lacks:
            out.append(f"{site}: no {', no '.join(lacks)}")
    return out


def _write_bundle(model: IntegerModel, x: np.ndarray, run, out_dir: Path, labels: np.ndarray | None,
                  trace_acc: bool, write: bool) -> dict:
    """Write every .memh file of one bundle into out_dir; also manifest.json when ``write``."""
    from qs4d_np.golden.stress import event_counts

    out_dir.mkdir(exist_ok=True)
    tensors: dict[str, dict] = {}

    def put(name: str, value: np.ndarray, width: int, signed: bool, kind: str, axes: list[str],
            layer: int | None, **extra) -> None:
        file = {"weight": "weights", "input": "inputs", "output": "expected", "trace": "expected"}[kind] \
            + f"/{name}.memh"
        write_memh(out_dir / file, value, width, signed=signed)
        tensors[name] = {"shape": list(value.shape), "width": width, "signed": signed, "file": file,
                         "output": kind == "output", "kind": kind, "axes": axes, "layer": layer, **extra}

    wfmt = _weight_formats(model)
    for name, value in model.arrays().items():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        grid = {}
        if name in wfmt:
            width, signed = wfmt[name].width, True
            grid = {"qmin": wfmt[name].qmin, "qmax": wfmt[name].qmax}
        else:
            width, signed = _word_width(name, model.layers[0].sig_bits if layer is None else
                                        model.layers[layer].sig_bits)
        axes = [f"dim{d}" for d in range(value.ndim)]
        put(name, value, width, signed, "weight", axes, layer, scale=_scale_of(model, name), **grid)
    put("x", x.astype(np.int64), model.in_fmt.width, True, "input", ["sample", "step", "feature"], None,
        scale=float(model.steps["in"]) if "in" in model.steps else None, qmin=model.in_fmt.qmin,
        qmax=model.in_fmt.qmax)
    for i, t in enumerate(run.layers):
        fmts = _layer_formats(model, i)
        for name in LAYER_TENSORS:
            axes = AXES_STATE if name.startswith("x_") else AXES_SEQ
            step = model.steps.get(f"layers.{i}.{name}")
            sig = name == "sig"  # unsigned, 0 .. 2**F in F + 1 bits, like sig_lut
            put(f"layers.{i}.{name}", t[name], fmts[name].width - sig, not sig, "output", axes, i,
                scale=None if step is None else np.asarray(step).tolist(),
                qmin=fmts[name].qmin, qmax=fmts[name].qmax)
            if name in ROUNDED:
                put(f"layers.{i}.sat_{name}", t["sat_" + name], 1, False, "output", axes, i)
            if trace_acc and "acc_" + name in t:
                put(f"layers.{i}.{name}.acc", t["acc_" + name], 64, True, "trace", axes, i)
    logit_fmt = model.decoder.requant.fmt
    sum_bound = model.length * model.layers[-1].out_fmt.maxabs
    steps = model.steps
    pooled_fmt = (bits_needed(-sum_bound, sum_bound), -sum_bound, sum_bound)  # may exceed IntFormat's 32 bits
    for name, value, (width, qmin, qmax), axes, step in (
            ("pooled", run.pooled, pooled_fmt, ["sample", "channel"], steps.get("out_last")),
            ("avg", run.avg, astuple(model.pool.fmt), ["sample", "channel"], steps.get("avg")),
            ("logits", run.logits, astuple(logit_fmt), ["sample", "class"], steps.get("logits"))):
        put(name, value, width, True, "output", axes, None, scale=None if step is None else float(step),
            qmin=qmin, qmax=qmax)
        if trace_acc and name != "pooled":
            put(f"{name}.acc", run.acc[name], 64, True, "trace", axes, None)
    put("predictions", run.predictions.astype(np.int64), max(2, bits_needed(0, run.logits.shape[1] - 1)),
        False, "output", ["sample"], None)
    manifest = {
        "spec_version": SPEC_VERSION, "kind": "model", "samples": int(x.shape[0]), "length": model.length,
        "d_input": model.d_input, "n_layers": len(model.layers),
        "layers": [_layer_entry(l) for l in model.layers],
        "saturation": run.saturation, "eps": model.eps, "tensors": tensors}
    manifest["accumulator_bits"] = accumulator_bits(model)
    manifest["multiplier_bits"] = max(int(np.max(v)).bit_length() for k, v in model.arrays().items()
                                      if _is_multiplier(k))
    manifest["events"] = event_counts(model, x, run)
    manifest["warnings"] = _warnings(manifest["events"])
    if labels is not None:
        manifest["labels"] = np.asarray(labels).astype(int).tolist()
    if write:
        atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


def _layer_entry(layer) -> dict:
    """A layer's manifest entry; with dropped modes also the original M and the kept mode indices."""
    entry = {"H": layer.core.H, "N2": layer.core.N2, "sig_bits": layer.sig_bits, "residual": layer.residual,
             "post": layer.post is not None}
    if layer.modes is not None:
        entry.update({"N2_original": layer.modes.M, "modes_kept": [list(k) for k in layer.modes.kept]})
    return entry


def _scale_of(model: IntegerModel, name: str):
    """The real step of a weight word (real = step * word), or None for multipliers, shifts, tables."""
    key = {"encoder.encoder_W": "encoder.W", "decoder.decoder_W": "decoder.W"}.get(name)
    if key is None and name.startswith("layers."):
        _, i, leaf = name.split(".", 2)
        key = f"layers.{i}." + {"mix_a_W": "W_a", "mix_b_W": "W_b"}.get(leaf, leaf)
    step = model.steps.get(key)
    return None if step is None else np.asarray(step, dtype=np.float64).tolist()


def dataset_codes(dataset, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer input codes (pixels, step 1/255) and labels of samples ``idx`` of a SequenceDataset.

    The integer input is the raw pixel: only un-normalised tasks (mean 0, std 1
    per channel, e.g. sMNIST) map pixel/255 onto it exactly.
    """
    if any(m != 0 for m in dataset.mean) or any(s != 1 for s in dataset.std):
        raise ValueError(f"the integer input path takes raw pixels (step 1/255); this dataset is normalised "
                         f"with mean {dataset.mean} and std {dataset.std}")
    raw = dataset.pixels[idx]
    if dataset.permutation is not None:
        raw = raw[:, dataset.permutation]
    return raw.astype(np.int64), dataset.labels[idx]
