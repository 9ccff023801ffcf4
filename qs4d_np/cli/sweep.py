"""``qs4d sweep`` and ``qs4d search``: many qs4d runs on a Dask cluster (local by default).

Examples::

    qs4d sweep spec.json --out sweeps/widths                   # local cluster, one worker per core
    qs4d sweep spec.json --out sweeps/widths --scheduler tcp://10.0.0.5:8786
    qs4d search --checkpoint runs/float --budget ace=8x --method ptq --out sweeps/alloc

A sweep spec (``qs4d_np.sweep.spec``) names the subcommand (``train``, ``ptq`` or
``eval``), the settings every trial shares and the axes that vary; every trial is
an ordinary run directory ``DIR/trials/NAME`` (``qs4d_np.cli.trial``), the manifest
``DIR/sweep.json`` records which are finished, so rerunning the command resumes.
Results: ``DIR/results.csv``, ``DIR/results.json`` and ``DIR/accuracy_vs_bits.png``.

``qs4d search`` allocates bits per target under a budget by the greedy procedure
of ``qs4d_np.sweep.search``, every candidate a trial on the same engine (PTQ of the
float checkpoint, or QAT fine-tuning from it); writes ``DIR/search.json``,
``DIR/search.png`` and the results table of all candidates.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from qs4d_np.cli.common import (CommandError, command, load_model, model_path, non_negative_int, positive_float,
                                positive_int)
from qs4d_np.cli.trial import TRIAL_COMMANDS, command_parser, run_trial, trial_quant
from qs4d_np.hardware.datapath import bit_widths, model_shape
from qs4d_np.hardware.metrics import BitWidths, cost_report
from qs4d_np.quant.config import TARGETS as QUANT_TARGETS
from qs4d_np.io import atomic_write_json
from qs4d_np.sweep.argv import parse_argv, settings_argv
from qs4d_np.sweep.engine import EngineConfig, connect, dashboard_link
from qs4d_np.sweep.errors import SweepError
from qs4d_np.sweep.manifest import Manifest
from qs4d_np.sweep.naming import trial_name
from qs4d_np.sweep.results import FIGURE, TARGETS, accuracy_figure, make_row, write_results
from qs4d_np.sweep.runner import SweepInterrupted, Trial, run_trials
from qs4d_np.sweep.search import BUDGET_METRICS, Budget, check_reachable, greedy_search, path_figure
from qs4d_np.sweep.spec import load_spec

INTERRUPTED = 130  # the shell's status of a command stopped by Ctrl-C


def register(subparsers: argparse._SubParsersAction) -> None:
    sweep = subparsers.add_parser("sweep", help="run a sweep of qs4d runs on a Dask cluster",
                                  description=__doc__.split("\n\n")[0])
    sweep.add_argument("spec", metavar="SPEC.json", help="the sweep spec")
    sweep.add_argument("--out", required=True, metavar="DIR", help="sweep directory (rerun to resume)")
    _engine_flags(sweep)
    sweep.set_defaults(func=run_sweep, parser_error=sweep.error)

    search = subparsers.add_parser("search", help="greedy bit allocation under an ACE / size / ADC budget",
                                   description="Greedy per-target bit allocation of a float model under a budget.")
    search.add_argument("--checkpoint", required=True, metavar="FLOAT_RUN", help="float run directory or model")
    search.add_argument("--budget", required=True, type=_budget, metavar="METRIC=VALUE",
                        help=f"METRIC one of {', '.join(BUDGET_METRICS)}; VALUE absolute or a reduction "
                             "factor vs float32 (ace=8x)")
    search.add_argument("--method", choices=("ptq", "qat"), default="ptq",
                        help="score candidates by PTQ or by QAT fine-tuning from the checkpoint")
    search.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    search.add_argument("--start-bits", type=positive_int, default=8)
    search.add_argument("--min-bits", type=positive_int, default=2)
    search.add_argument("--step", type=positive_int, default=1, help="bits a move lowers a target by")
    search.add_argument("--base", type=_json_object, default={}, metavar="JSON",
                        help="settings of every candidate's qs4d ptq / train run, as in a sweep spec's base "
                             "(e.g. '{\"epochs\": 2, \"lr\": 0.002}')")
    search.add_argument("--out", required=True, metavar="DIR", help="search directory (rerun to resume)")
    _engine_flags(search)
    search.set_defaults(func=run_search, parser_error=search.error)


def _engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine (dask.distributed)")
    group.add_argument("--workers", type=positive_int, default=None,
                       help="local cluster: worker processes, one trial each at a time "
                            "(default: cores / --threads-per-worker)")
    group.add_argument("--threads-per-worker", type=positive_int, default=1, metavar="T",
                       help="Numba / BLAS threads of each trial (local workers start with them set)")
    group.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="an existing cluster's scheduler (tcp://host:8786) instead of a local cluster")
    group.add_argument("--retries", type=non_negative_int, default=2,
                       help="times a trial whose worker died is run again (from its last checkpoint)")
    group.add_argument("--connect-timeout", type=positive_float, default=10.0, metavar="SECONDS",
                       help="give up on an unreachable --scheduler after this long")
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def _budget(text: str) -> Budget:
    try:
        return Budget.parse(text)
    except SweepError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


# -- planning trials ------------------------------------------------------------------------------
class Planner:
    """Turns settings into checked trials of one subcommand in one sweep directory."""

    def __init__(self, command_name: str, folder: Path, threads: int, extra_reserved: tuple[str, ...] = ()):
        self.info = TRIAL_COMMANDS[command_name]
        self.parser = command_parser(command_name)
        self.folder = folder
        self.threads = threads
        self.reserved = self.info.reserved + extra_reserved

    def plan(self, settings: dict[str, Any], where: str,
             widths: dict[str, int] | None = None) -> tuple[Trial, argparse.Namespace]:
        """The trial of ``settings`` (and ``widths`` for ``ptq``) and its parsed arguments; anything
        the subcommand would refuse raises ``SweepError`` naming the key."""
        given = {k: os.path.abspath(v) if k in self.info.path_keys and isinstance(v, str) else v
                 for k, v in settings.items()}
        argv = settings_argv(self.parser, given, where=where, reserved=self.reserved)
        self._check_paths(given, where)
        if self.info.name == "train" and "quiet" not in settings:
            argv.append("--quiet")  # a progress bar per epoch in a log file helps nobody
        name = trial_name(self.info.name, settings if widths is None else {**settings, "widths": widths})
        run_dir = self.folder / "trials" / name
        args = parse_argv(self.parser, [*argv, "--out", str(run_dir)], where=where)
        for key in self.info.single if widths is None else ():
            if len(getattr(args, key)) != 1:
                raise SweepError(f"{where}: key {key!r}: a {self.info.name} trial is one (target, bits) point, "
                                 f"got {getattr(args, key)}; make it an axis to sweep several")
        if self.info.name == "ptq" and widths is None:
            widths = {args.targets[0]: args.bits[0]}
        try:
            quant = trial_quant(self.info.name, args, widths)
            for target in (QUANT_TARGETS if quant is not None else ()):
                quant.spec_for(target)
        except ValueError as exc:
            raise SweepError(f"{where}: the quantization is not valid: {exc}") from None
        payload = {"command": self.info.name, "argv": argv, "run_dir": str(run_dir), "threads": self.threads,
                   "widths": widths}
        return Trial(name, payload), args

    def _check_paths(self, settings: dict[str, Any], where: str) -> None:
        """The files a trial reads exist (a worker would fail on them after the sweep started)."""
        for key in self.info.path_keys:
            value = settings.get(key)
            if value is None:
                continue
            try:
                if key in ("checkpoint", "init_from"):
                    model_path(value)
                elif not (Path(value).is_dir() if key == "data_dir" else Path(value).is_file()):
                    raise CommandError(f"{value}: no such {'folder' if key == 'data_dir' else 'file'}")
            except CommandError as exc:
                raise SweepError(f"{where}: key {key!r}: {exc}") from None


def _engine(args: argparse.Namespace) -> EngineConfig:
    if args.scheduler is not None and args.workers is not None:
        args.parser_error("--workers sets up a local cluster; an existing --scheduler has its own workers")
    return EngineConfig(scheduler=args.scheduler, workers=args.workers, threads=args.threads_per_worker,
                        connect_timeout=args.connect_timeout)


def _interrupted(exc: KeyboardInterrupt, out: Path, what: str) -> int:
    done = f" ({exc})" if isinstance(exc, SweepInterrupted) else ""
    print(f"qs4d {what}: interrupted{done}; every file is whole. Rerun the same command to continue "
          f"from {out / 'sweep.json'}.", file=sys.stderr)
    return INTERRUPTED


def _print_table(rows: list[dict[str, Any]], keys: list[str]) -> None:
    cells = [[_text(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


def _failures(manifest: Manifest, names: list[str], what: str) -> int:
    failed = [n for n in names if manifest.trials[n]["status"] == "failed"]
    for name in failed:
        print(f"qs4d {what}: trial {name} failed: {manifest.trials[name]['error']} "
              f"(log: {manifest.run_dir(name) / 'trial.log'})", file=sys.stderr)
    if failed:
        print(f"qs4d {what}: {len(failed)} of {len(names)} trials failed; rerun the command to retry them",
              file=sys.stderr)
    return 1 if failed else 0


# -- qs4d sweep -------------------------------------------------------------------------------------
@command("sweep")
def run_sweep(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, tuple(TRIAL_COMMANDS))
    out = Path(args.out).resolve()
    engine = _engine(args)
    planner = Planner(spec.command, out, args.threads_per_worker)
    planned = []
    for settings in spec.trials():  # every trial is checked before anything runs or is written
        where = f"spec {args.spec}, trial {json.dumps(spec.axis_values(settings), sort_keys=True)}"
        planned.append((planner.plan(settings, where)[0], settings))
    manifest = Manifest.open(out, "sweep", spec.to_dict())
    for trial, settings in planned:
        manifest.add(trial.name, settings)
    manifest.save()
    trials = [t for t, _ in planned]
    finished = sum(manifest.done(t.name) for t in trials)
    print(f"sweep: {len(trials)} trials of qs4d {spec.command} in {out / 'trials'}; "
          f"{finished} finished, {len(trials) - finished} to run")
    try:
        if finished < len(trials):
            with connect(engine) as client:
                link = dashboard_link(client)
                if link:
                    print(f"Dask dashboard: {link}")
                run_trials(client, run_trial, trials, manifest, retries=args.retries, progress=not args.quiet)
    except KeyboardInterrupt as exc:
        return _interrupted(exc, out, "sweep")
    rows = [make_row(t.name, spec.axis_values(s), manifest.trials[t.name]) for t, s in planned]
    written = write_results(out, rows, list(spec.axes))
    figure = accuracy_figure(rows, out / FIGURE, title=f"{args.spec}: test accuracy vs bits")
    _print_table(rows, ["trial", *spec.axes, "method", "test_acc", "val_acc", "ace", "model_size_bits", "adc"])
    print(json.dumps({"wrote": [str(p) for p in written] + ([str(figure)] if figure else [])}))
    return _failures(manifest, [t.name for t in trials], "sweep")


# -- qs4d search ----------------------------------------------------------------------------------
class SearchTrials:
    """The search's view of its trials: the cost of widths, and their evaluation on the engine."""

    def __init__(self, args: argparse.Namespace, manifest: Manifest, client: Any = None):
        self.args, self.manifest, self.client = args, manifest, client
        self.checkpoint = os.path.abspath(args.checkpoint)
        qat = args.method == "qat"
        reserved = ("init_from",) + tuple(f"{t}_quant" for t in TARGETS + ("all", "B")) if qat else ("bits", "targets")
        self.planner = Planner("train" if qat else "ptq", manifest.folder, args.threads_per_worker, reserved)
        self.shape = model_shape(load_model(args.checkpoint))
        self.metric = BUDGET_METRICS[args.budget.metric]
        self.plans: dict[tuple, tuple[Trial, float]] = {}

    def float_cost(self) -> float:
        return float(getattr(cost_report(self.shape, BitWidths.float32()), self.metric))

    def _plan(self, widths: dict[str, int]) -> tuple[Trial, float]:
        key = tuple(sorted(widths.items()))
        if key not in self.plans:
            where = f"--base, candidate {json.dumps(widths, sort_keys=True)}"
            if self.args.method == "qat":
                settings = {**self.args.base, "init_from": self.checkpoint,
                            **{f"{t}_quant": 2 ** b for t, b in widths.items()}}
                trial, parsed = self.planner.plan(settings, where)
            else:
                settings = {**self.args.base, "checkpoint": self.checkpoint}
                trial, parsed = self.planner.plan(settings, where, widths=dict(widths))
            quant = trial_quant(self.planner.info.name, parsed, widths)
            cost = float(getattr(cost_report(self.shape, bit_widths(quant, 0)), self.metric))
            self.plans[key] = (trial, cost)
        return self.plans[key]

    def cost(self, widths: dict[str, int]) -> float:
        return self._plan(widths)[1]

    def evaluate(self, candidates: list[dict[str, int]]) -> list[dict[str, Any]]:
        trials = [self._plan(w)[0] for w in candidates]
        for trial, widths in zip(trials, candidates):
            self.manifest.add(trial.name, {"widths": widths})
        self.manifest.save()
        results = run_trials(self.client, run_trial, trials, self.manifest, retries=self.args.retries,
                             progress=not self.args.quiet, desc="candidates")
        missing = [t.name for t in trials if t.name not in results]
        if missing:
            errors = "; ".join(f"{n}: {self.manifest.trials[n]['error']}" for n in missing)
            raise SweepError(f"the search cannot continue, candidate trial(s) failed: {errors} "
                             "(rerun the command to retry them)")
        return [results[t.name] for t in trials]


@command("search")
def run_search(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    engine = _engine(args)
    identity = {"checkpoint": os.path.abspath(args.checkpoint), "budget": str(args.budget), "method": args.method,
                "targets": args.targets, "start_bits": args.start_bits, "min_bits": args.min_bits,
                "step": args.step, "base": args.base}
    probe = SearchTrials(args, Manifest(out, "search", identity, {}))
    limit = args.budget.limit(probe.float_cost())
    # the settings and the budget are checked before anything runs or is written
    check_reachable(args.targets, probe.cost, limit, start=args.start_bits, minimum=args.min_bits, step=args.step)
    manifest = Manifest.open(out, "search", identity)
    search = SearchTrials(args, manifest)
    print(f"search: {args.method} candidates, budget {args.budget} -> {args.budget.metric} <= {limit:,.0f} "
          f"(float32: {search.float_cost():,.0f})")
    try:
        with connect(engine) as client:
            search.client = client
            link = dashboard_link(client)
            if link:
                print(f"Dask dashboard: {link}")
            path = greedy_search(args.targets, search.cost, search.evaluate, limit, start=args.start_bits,
                                 minimum=args.min_bits, step=args.step)
    except KeyboardInterrupt as exc:
        return _interrupted(exc, out, "search")
    final = path[-1]
    summary = {"budget": str(args.budget), "metric": args.budget.metric, "limit": limit,
               "float_cost": search.float_cost(), "method": args.method, "widths": final.widths,
               "cost": final.cost, "val_acc": final.result["val_acc"], "test_acc": final.result.get("test_acc"),
               "run_dir": final.result["run_dir"], "path": [s.to_dict() for s in path]}
    atomic_write_json(out / "search.json", summary)
    figure = path_figure(path, out / "search.png", args.budget.metric, limit, search.float_cost(),
                         title=f"greedy {args.method} bit allocation, budget {args.budget}")
    names = list(manifest.trials)
    rows = [make_row(n, {}, manifest.trials[n]) for n in names]
    written = write_results(out, rows, [])
    print("chosen widths: " + " ".join(f"{t}={b}" for t, b in final.widths.items()))
    _print_table([{"step": i, "move": "start" if s.move is None else f"{s.move['target']} {s.move['from']}->"
                   f"{s.move['to']}", args.budget.metric: int(s.cost), "val_acc": s.result["val_acc"],
                   "test_acc": s.result.get("test_acc")} for i, s in enumerate(path)],
                 ["step", "move", args.budget.metric, "val_acc", "test_acc"])
    print(json.dumps({"wrote": [str(out / "search.json"), str(figure)] + [str(p) for p in written]}))
    return 0
