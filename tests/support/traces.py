"""What a trace id payfleet made itself looks like (domain.events.new_trace_id:
a uuid4's 32 hex digits), where no provider gave one."""

from __future__ import annotations

import re

FRESH_TRACE = re.compile(r"^[0-9a-f]{32}$")
