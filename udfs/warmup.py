"""Python-worker side of the pipeline's head start: workers that have imported what the stages run."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence

import pandas as pd


def import_modules(modules: Sequence[str]) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """A mapInPandas function that imports `modules` in its worker and passes its rows through."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for name in modules:
            importlib.import_module(name)
        yield from batches

    return run
