"""Runs a Databricks notebook source file (`notebooks/*.py`) cell by cell in this process, as a cluster
would: the cells see `spark` (the given session), `dbutils.widgets` and `display`, the three names a
Databricks notebook finds defined. Markdown cells (`# MAGIC`) are skipped. A cell that raises fails the
run with the cell's number in the traceback (its code is compiled under `<notebook>:cell<N>`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CELL_BREAK = "# COMMAND ----------"
HEADER = "# Databricks notebook source"


class WidgetNotDefined(KeyError):
    """`dbutils.widgets.get` of a name no cell defined (Databricks raises InputWidgetNotDefined)."""


@dataclass
class Widgets:
    """`dbutils.widgets`: text and dropdown widgets whose values are the defaults unless `values` sets them
    (as a job's parameters or a user's entries do)."""

    values: dict[str, str]
    defaults: dict[str, str] = field(default_factory=dict)
    choices: dict[str, list[str]] = field(default_factory=dict)

    def text(self, name: str, default: str, label: str | None = None) -> None:
        self.defaults[name] = default

    def dropdown(self, name: str, default: str, choices: list[str], label: str | None = None) -> None:
        if default not in choices:  # Databricks refuses it too
            raise ValueError(f"widget {name}: default {default!r} is not one of its choices")
        self.defaults[name], self.choices[name] = default, list(choices)

    def get(self, name: str) -> str:
        if name not in self.defaults:
            raise WidgetNotDefined(name)
        value = self.values.get(name, self.defaults[name])
        if name in self.choices and value not in self.choices[name]:
            raise ValueError(f"widget {name}: {value!r} is not one of {self.choices[name]}")
        return value


@dataclass
class DBUtils:
    widgets: Widgets


def cells(path: Path) -> list[str]:
    """The code cells of a notebook source file, in order (markdown-only cells left out)."""
    text = path.read_text()
    if not text.startswith(HEADER):
        raise ValueError(f"{path} is not a Databricks notebook source file")
    code = []
    for cell in text.removeprefix(HEADER).split(CELL_BREAK):
        lines = [line for line in cell.splitlines() if not line.startswith("# MAGIC")]
        if any(line.strip() and not line.lstrip().startswith("#") for line in lines):
            code.append("\n".join(lines))
    return code


@dataclass
class NotebookRun:
    namespace: dict[str, Any]  # the notebook's variables after its last cell
    displayed: list[list]  # the rows of each `display(...)`, in order


def run_notebook(path: Path, spark, widget_values: dict[str, str]) -> NotebookRun:
    """Run every code cell of `path` in one namespace; `display(df)` collects the frame's rows (a cluster
    renders them: a failing query fails the cell either way)."""
    displayed: list[list] = []

    def display(df) -> None:
        displayed.append(df.limit(1000).collect())

    namespace: dict[str, Any] = {
        "__name__": "__main__",
        "spark": spark,
        "dbutils": DBUtils(Widgets(dict(widget_values))),
        "display": display,
    }
    for number, code in enumerate(cells(path), start=1):
        exec(compile(code, f"{path.name}:cell{number}", "exec"), namespace)  # noqa: S102
    return NotebookRun(namespace, displayed)
