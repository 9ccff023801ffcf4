"""Trial names: a stable hash of what a trial runs, so a rerun finds its run directory again."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

HASH_CHARS = 12  # 48 bits: collisions are negligible for sweeps of thousands of trials


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys and no whitespace: equal settings give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def trial_name(command: str, settings: Mapping[str, Any]) -> str:
    """``COMMAND-HASH``: the first ``HASH_CHARS`` hex digits of the SHA-256 of the command and settings.

    The settings are hashed as written (``16`` and ``16.0`` are different trials); key order
    does not matter.
    """
    text = canonical_json({"command": command, "settings": dict(settings)})
    return f"{command}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:HASH_CHARS]}"
