"""`--config FILE`: a command's options from a TOML file; the command line wins.

Keys are the long options as typed, without the dashes (`kv-budget-tokens` or `kv_budget_tokens`,
`blocks`, `identity`);
values are TOML strings, numbers, booleans (for `--x/--no-x` flags) or arrays (for options that
repeat, like `initial-peers`). An unknown key, or a file that is not TOML, is an error that
names it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import click


def _load(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        data = tomllib.loads(Path(value).read_text())
    except OSError as exc:
        raise click.BadParameter(f"cannot read {value}: {exc.strerror}", ctx, param) from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{value} is not valid TOML: {exc}", ctx, param) from None
    names = {  # the long flags as typed on the command line, without their dashes
        opt[2:]: p
        for p in ctx.command.params
        if isinstance(p, click.Option) and p.name and p.name != "config"
        for opt in p.opts
        if opt.startswith("--")
    }
    defaults: dict[str, Any] = {}
    for key, item in data.items():
        flag = key.replace("_", "-")
        if flag not in names:
            known = ", ".join(sorted(names))
            raise click.BadParameter(
                f"{value}: {key!r} is not an option of `{ctx.command_path}` (options: {known})",
                ctx,
                param,
            )
        option = names[flag]
        name = str(option.name)
        if option.multiple and not isinstance(item, list):
            item = [item]
        if isinstance(item, list) and not option.multiple and option.nargs == 1:
            raise click.BadParameter(f"{value}: {key!r} takes one value, not a list", ctx, param)
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def config_option(f: Any) -> Any:
    """`--config FILE`, read before the other options (they default to the file's values)."""
    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_load,
        help="TOML file of this command's options (keys as the long option names); the "
        "command line wins.",
    )(f)
