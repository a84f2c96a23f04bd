"""``worker config show``: the configuration ``worker serve`` would run with, given the
same flags, environment and TOML file, and where each value came from."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from worker import durations
from worker.cli_common import EXIT_USAGE, fail, print_json, stdout_console
from worker.config import SECRETS, ConfigError, flag_name, load_config_with_origins


def shown(name: str, value: Any) -> Any:
    """A value as an operator writes it: durations in Go syntax, lists comma-separated;
    secrets as ``***``."""
    if name in SECRETS:
        return "***" if value else ""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, float):
        return durations.format(value)
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, Path):
        return str(value)
    return value


def _show(json_out: bool = False, **given: Any) -> None:
    flags = {name: value for name, value in given.items() if value is not None}
    try:
        config, origins = load_config_with_origins(flags, os.environ)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    names = config.__struct_fields__
    if json_out:
        print_json(
            {
                name: {"Value": shown(name, getattr(config, name)), "Source": origins[name]}
                for name in names
            }
        )
        return
    table = Table("SETTING", "VALUE", "SOURCE")
    for name in names:
        value = shown(name, getattr(config, name))
        setting = f"--{flag_name(name)}" if name not in SECRETS else name
        table.add_row(
            setting, str(value), origins[name], style="dim" if origins[name] == "default" else ""
        )
    stdout_console().print(table)


def make_app(option: Callable[[str], inspect.Parameter], fields: Sequence[str]) -> typer.Typer:
    """The ``config`` group; ``show`` takes every flag of ``serve`` (``option`` builds one)."""
    app = typer.Typer(help="The node's configuration.", no_args_is_help=True, rich_markup_mode=None)
    json_param = inspect.Parameter(
        "json_out",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(False, "--json", help="Print JSON: {field: {Value, Source}}."),
        annotation=bool,
    )

    def show(**given: Any) -> None:
        _show(**given)

    show.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [json_param, *(option(f) for f in fields)]
    )
    show.__doc__ = """Show the configuration `worker serve` would run with, given the same
    flags, and where each value came from: a flag, a WORKER_* variable, the --config TOML
    file (file: key) or the default. Secrets are shown as ***.

    Exit codes: 0 shown, 2 a bad flag, variable or TOML key (the same error as serve).
    """
    app.command("show")(show)
    return app
