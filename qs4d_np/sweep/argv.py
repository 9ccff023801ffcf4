"""A trial's settings as the argv of a subcommand, checked by that subcommand's own parser.

A settings key is a long flag with ``-`` written ``_`` (``limit_train`` is
``--limit-train``, ``d_model_m`` is ``--d_model_m``). A flag that takes no value
(``--quiet``) takes ``true`` / ``false``; a flag with several values
(``--bits 2 4``) takes a list or one value; every other flag one string or number;
``null`` leaves the flag out (its default), which lets zipped axes set a flag in some
trials only (``{"A_quant": [16, null], "C_quant": [null, 16]}``).
The parser then converts and checks the values exactly as on the command line, so
a spec is refused before anything runs for anything ``qs4d CMD`` would refuse.
"""
from __future__ import annotations

import argparse
from typing import Any, Iterable, Mapping

from qs4d_np.sweep.errors import SweepError


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Settings key -> the parser's action, for every long option (``--help`` aside)."""
    table = {}
    # argparse has no public list of a parser's options; this method has been there since Python 2.7
    # (the parser is the standard library's object, not one of ours).
    for action in argparse.ArgumentParser._get_optional_actions(parser):
        if isinstance(action, argparse._HelpAction):
            continue
        for option in action.option_strings:
            if option.startswith("--"):
                table[option[2:].replace("-", "_")] = action
    return table


def _texts(key: str, value: Any, action: argparse.Action, where: str) -> list[str] | None:
    """The command-line words of one value (None: leave the flag out)."""
    if value is None:  # null: the flag's default (with "zip", an axis can set a flag in some trials only)
        return None
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise SweepError(f"{where}: key {key!r} is a flag without a value: give true or false, got {value!r}")
        return [] if value else None
    values = value if isinstance(value, list) and action.nargs in ("+", "*") else [value]
    if not values:
        raise SweepError(f"{where}: key {key!r} needs at least one value, got []")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise SweepError(f"{where}: key {key!r} takes "
                             + ("a list of strings or numbers" if action.nargs in ("+", "*") else
                                "one string or number") + f", got {value!r}")
    return [str(v) for v in values]


def settings_argv(parser: argparse.ArgumentParser, settings: Mapping[str, Any], *, where: str,
                  reserved: Iterable[str] = ()) -> list[str]:
    """The argv of ``settings`` for ``parser``; unknown and ``reserved`` keys (those the sweep sets
    itself) and values the key cannot take are refused, naming the key."""
    actions = flag_actions(parser)
    reserved = set(reserved)
    argv: list[str] = []
    for key in settings:
        if key in reserved:
            raise SweepError(f"{where}: key {key!r} is set by the sweep itself and cannot be given")
        if key not in actions:
            accepted = ", ".join(sorted(k for k in actions if k not in reserved))
            spelled = " or ".join(dict.fromkeys((f"--{key}", f"--{key.replace('_', '-')}")))
            raise SweepError(f"{where}: unknown key {key!r}: `qs4d {parser.prog.split()[-1]}` has no flag "
                             f"{spelled}; its keys are: {accepted}")
        action = actions[key]
        texts = _texts(key, settings[key], action, where)
        if texts is not None:
            argv += [max(action.option_strings, key=len), *texts]
    return argv


class _Refused(Exception):
    pass


def parse_argv(parser: argparse.ArgumentParser, argv: list[str], *, where: str) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but a refusal raises ``SweepError`` naming the spec key
    instead of printing the usage and exiting."""
    def refuse(message: str) -> None:
        raise _Refused(message)

    actions = flag_actions(parser)
    saved = parser.error
    parser.error = refuse  # argparse reports every refusal through this method
    try:
        return parser.parse_args(argv)
    except _Refused as exc:
        message = str(exc)
        keys = [key for key, action in actions.items()
                if message.startswith(f"argument {'/'.join(action.option_strings)}:")]
        named = f"key {keys[0]!r}: " if keys else ""
        raise SweepError(f"{where}: {named}{message}") from None
    finally:
        parser.error = saved
