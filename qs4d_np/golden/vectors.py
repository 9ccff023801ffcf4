"""``.memh`` test vectors: one two's-complement hex word per line, for ``$readmemh``.

A word of ``width`` bits is written as ``value & (2**width - 1)`` in exactly
ceil(width / 4) lower-case hex digits; reading sign-extends it back. A vector
directory holds one ``.memh`` file per tensor (row-major, C order) and a
``config.json`` naming every file's shape, width and signedness.

A vector directory is written as a whole (``staged_export``): into a hidden
sibling first, renamed into place only when complete, so an interrupted
re-export never leaves new ``.memh`` files next to the old metadata.
"""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from qs4d_np.core.checks import check_int
from qs4d_np.golden.fixedpoint import IntFormat, check_in_range, word_range
from qs4d_np.golden.layer import SPEC_VERSION, WEIGHT_FORMAT, SSMCore, SSMCoreFormats, SSMCoreTrace
from qs4d_np.io import atomic_write_json, atomic_write_text, load_json

METADATA = ("manifest.json", "config.json")

MULT_WIDTH = 64   # multipliers are < 2**63: a non-negative 64-bit word
SHIFT_WIDTH = 8   # shifts are 0..62
HEX_DIGITS = set("0123456789abcdefABCDEF")


def write_memh(path: str | os.PathLike, values: np.ndarray, width: int, *, signed: bool = True) -> None:
    """Write integer ``values`` (any shape, C order) as one ``width``-bit hex word per line."""
    lo, hi = word_range(width, signed)
    flat = check_in_range(f"values for {path}", values, lo, hi,
                          f"a {'signed' if signed else 'unsigned'} {width}-bit word").ravel()
    digits, mask = (width + 3) // 4, (1 << width) - 1
    atomic_write_text(path, "".join(f"{int(v) & mask:0{digits}x}\n" for v in flat))


def read_memh(path: str | os.PathLike, width: int, count: int, *, signed: bool = True) -> np.ndarray:
    """Read exactly ``count`` ``width``-bit hex words, sign-extended if ``signed``; int64 (count,).

    As ``$readmemh`` reads a dump: blank lines and ``//`` comments (whole-line or trailing) are
    skipped, and an ``@addr`` line (hex word address) is accepted where it names the next word
    (``$writememh`` and many RTL dumpers write them); an address that jumps is an error. Every word
    must hold exactly ceil(width / 4) hex digits whose value fits ``width`` bits; anything else (a
    non-hex word, a short or long word, too few or too many words) raises ValueError naming the file
    and the line.
    """
    path = Path(path)
    count = check_int("count", count, min_value=0)
    word_range(width, signed)
    if not path.is_file():
        raise FileNotFoundError(f"no such vector file: {path}")
    digits, limit = (width + 3) // 4, 1 << width
    out = np.empty(count, dtype=np.int64)
    n = 0
    last = 0
    for i, line in enumerate(path.read_text(encoding="ascii", errors="replace").splitlines()):
        word = line.split("//", 1)[0].strip()
        if not word:
            continue
        last = i + 1
        if word.startswith("@"):
            addr = word[1:]
            if not addr or not set(addr) <= HEX_DIGITS or int(addr, 16) != n:
                raise ValueError(f"{path}:{i + 1}: address {word!r} does not name the next word ({n:x}); "
                                 f"only sequential addresses are supported")
            continue
        if len(word) != digits or not set(word) <= HEX_DIGITS:
            raise ValueError(f"{path}:{i + 1}: expected a {digits}-digit hex word, got {line!r}")
        value = int(word, 16)
        if value >= limit:
            raise ValueError(f"{path}:{i + 1}: word {word} does not fit {width} bits")
        if n == count:
            raise ValueError(f"{path}:{i + 1}: expected {count} words, this is word {count + 1} (extra)")
        out[n] = value - limit if signed and value >= limit >> 1 else value
        n += 1
    if n < count:
        raise ValueError(f"{path}: expected {count} words, found {n} (it ends after line {last}, truncated?)")
    return out


def _export_files(directory: Path) -> set[str]:
    """Relative paths of the files a previous export in ``directory`` wrote; ValueError if it is none."""
    meta = [name for name in METADATA if (directory / name).is_file()]
    refuse = (f"{directory} is not empty and is not a vector export; refusing to replace it "
              f"(export into a new or empty directory)")
    if not meta:
        raise ValueError(f"{refuse}: it has neither manifest.json nor config.json")
    try:
        config = load_json(directory / meta[0])
        files = {meta[0]} | {spec.get("file", f"{name}.memh") for name, spec in config["tensors"].items()}
        return files | set(config.get("stress", {}).get("files", []))  # a bundle's stress sub-bundle
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{refuse}: {meta[0]} does not list its tensors ({exc!r})") from None


def _check_replaceable(directory: Path) -> None:
    """Allow a missing or empty ``directory`` or one holding exactly a previous export's files."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"vector directory {directory} exists and is not a directory")
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir()}
    if not present:
        return
    extra = sorted(present - _export_files(directory))
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise ValueError(f"{directory} holds a previous export and {len(extra)} other file(s) ({shown}); "
                         f"re-exporting would delete them: move them away or export elsewhere")


@contextmanager
def staged_export(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden sibling of ``directory`` to write an export into; then swap it in.

    ``directory`` must be missing, empty, or a previous export with no other
    files (checked before and again right before the swap; user files are never
    deleted). On success the previous export is renamed aside, the new one
    renamed into place and the old one deleted; on any exception the staged
    files are removed and ``directory`` is untouched. After a hard kill a hidden
    ``.<name>.*.partial`` sibling may remain; ``directory`` itself is then
    still the complete old export (or, between the two renames, missing with
    the old export in ``.<name>.*.old``).
    """
    directory = Path(directory)
    _check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tag = f".{directory.name}.{uuid.uuid4().hex[:12]}"
    staged = directory.with_name(tag + ".partial")
    staged.mkdir()  # mode from the umask, as a plain export folder would get
    try:
        yield staged
        _check_replaceable(directory)
        if directory.exists():
            old = directory.with_name(tag + ".old")
            os.rename(directory, old)
            try:
                os.rename(staged, directory)
            except BaseException:
                os.rename(old, directory)
                raise
            shutil.rmtree(old)
        else:
            os.rename(staged, directory)
    finally:
        if staged.exists():
            shutil.rmtree(staged)


def _tensor_specs(core: SSMCore, batch: int, length: int) -> dict[str, dict]:
    """name -> shape, width, signedness, and whether the file is an expected output."""
    f, H, N2 = core.formats, core.H, core.N2
    specs = {}
    for name, fmt in WEIGHT_FORMAT.items():
        specs[name] = ((H, N2) if name != "D" else (H,), getattr(f, fmt).width, True, False)
    for name in core.REQUANT_HN + core.REQUANT_H:
        shape = (H, N2) if name in core.REQUANT_HN else (H,)
        specs[name] = (shape, SHIFT_WIDTH if name.startswith("r_") else MULT_WIDTH, True, False)
    specs["u"] = ((batch, length, H), f.u.width, True, False)
    for name in ("x_re", "x_im"):
        specs[name] = ((batch, length, H, N2), f.x.width, True, True)
        specs["sat_" + name] = ((batch, length, H, N2), 1, False, True)
    specs["y"] = ((batch, length, H), f.y.width, True, True)
    specs["sat_y"] = ((batch, length, H), 1, False, True)
    return {k: {"shape": list(s), "width": w, "signed": sg, "output": o} for k, (s, w, sg, o) in specs.items()}


def write_ssm_vectors(directory: str | os.PathLike, core: SSMCore, u: np.ndarray,
                      trace: SSMCoreTrace, *, layer: int = 0) -> Path:
    """Export one SSM core run: weights, multipliers, inputs and the expected trace.

    The directory is replaced as a whole (``staged_export``); returns its path.
    """
    directory = Path(directory)
    batch, length, _ = u.shape
    specs = _tensor_specs(core, batch, length)
    arrays = {**core.arrays(), "u": u, **{k: getattr(trace, k) for k in
                                          ("x_re", "x_im", "y", "sat_x_re", "sat_x_im", "sat_y")}}
    for name, spec in specs.items():
        if list(arrays[name].shape) != spec["shape"]:
            raise ValueError(f"{name} must have shape {tuple(spec['shape'])}, got {arrays[name].shape}")
    fmts = {k: {"width": v.width, "qmin": v.qmin, "qmax": v.qmax} for k, v in vars(core.formats).items()}
    with staged_export(directory) as staged:
        for name, spec in specs.items():
            write_memh(staged / f"{name}.memh", arrays[name], spec["width"], signed=spec["signed"])
        atomic_write_json(staged / "config.json", {
            "spec_version": SPEC_VERSION, "kind": "ssm_core", "layer": layer, "H": core.H,
            "N2": core.N2, "batch": batch, "length": length, "formats": fmts, "tensors": specs})
    return directory


def load_vector_config(directory: str | os.PathLike) -> dict:
    """A vector directory's metadata: ``manifest.json`` (whole model) or ``config.json`` (one SSM core)."""
    directory = Path(directory)
    name = METADATA[0] if (directory / METADATA[0]).is_file() else METADATA[1]
    if not (directory / name).is_file():
        raise FileNotFoundError(f"{directory} has neither manifest.json nor config.json: not a vector directory")
    config = load_json(directory / name)
    if not isinstance(config, dict) or config.get("spec_version") != SPEC_VERSION:
        got = config.get("spec_version") if isinstance(config, dict) else None
        raise ValueError(f"{directory}/{name} has spec_version {got!r}; this code reads version {SPEC_VERSION}")
    tensors = config.get("tensors")
    if not isinstance(tensors, dict) or not tensors:
        raise ValueError(f"{directory}/{name} has no 'tensors' table (name -> shape, width, signed, file); "
                         f"got {type(tensors).__name__ if tensors is not None else 'nothing'}")
    for tensor, spec in tensors.items():
        _check_spec(f"{directory}/{name}: tensor {tensor!r}", spec)
    return config


def _check_spec(where: str, spec: object) -> None:
    """A tensor entry must give a shape of ints >= 0, a width 1..64, signed and output as booleans."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a table, got {spec!r}")
    checks = (("shape", lambda v: isinstance(v, list) and all(type(d) is int and d >= 0 for d in v),
               "a list of integers >= 0"),
              ("width", lambda v: type(v) is int and 1 <= v <= 64, "an integer 1..64"),
              ("signed", lambda v: isinstance(v, bool), "true or false"),
              ("output", lambda v: isinstance(v, bool), "true or false"))
    for key, ok, what in checks:
        if key not in spec:
            raise ValueError(f"{where} has no {key!r} (expected {what})")
        if not ok(spec[key]):
            raise ValueError(f"{where} has {key} {spec[key]!r}; expected {what}")
    if "file" in spec and not isinstance(spec["file"], str):
        raise ValueError(f"{where} has file {spec['file']!r}; expected a relative path")


def read_tensor(directory: str | os.PathLike, name: str, spec: dict) -> np.ndarray:
    """Read one tensor of a vector directory, shaped as its config entry says."""
    shape = tuple(spec["shape"])
    words = read_memh(Path(directory) / spec.get("file", f"{name}.memh"), spec["width"],
                      int(np.prod(shape)), signed=spec["signed"])
    return words.reshape(shape)


def read_ssm_vectors(directory: str | os.PathLike) -> tuple[SSMCore, np.ndarray, dict]:
    """Rebuild the core and its input ``u`` from a vector directory; also return the config."""
    config = load_vector_config(directory)
    formats = SSMCoreFormats(**{k: IntFormat(**v) for k, v in config["formats"].items()})
    tensors = {k: read_tensor(directory, k, spec) for k, spec in config["tensors"].items()
               if not spec["output"]}
    u = tensors.pop("u")
    return SSMCore(formats, **tensors), u, config
