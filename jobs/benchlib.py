"""What every benchmark job shares: writing its result as JSON next to the printed table."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(result: dict, out: str | Path) -> Path:
    """Write `result` to `out` (creating its folder) and say where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)  # a reader never sees half a file
    print(f"wrote {out}", flush=True)
    return out
