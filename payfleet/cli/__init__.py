"""The `payfleet` command, the composition root: it may import every process
package and the platform below them; nothing imports it."""

from __future__ import annotations

import json
from typing import Any


def print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, default=str))
