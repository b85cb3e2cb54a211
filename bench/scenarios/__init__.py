"""The scenarios, by name. Each takes the run's context and fills an Outcome."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from bench.fleet import Template
from bench.params import Params
from bench.report import Outcome


@dataclass(frozen=True)
class Context:
    template: Template
    params: Params


Scenario = Callable[[Context, Outcome], None]


def load(name: str) -> Scenario:
    """The `run` of bench/scenarios/<name>.py."""
    module = importlib.import_module(f"bench.scenarios.{name}")
    run: Scenario = module.run
    return run
