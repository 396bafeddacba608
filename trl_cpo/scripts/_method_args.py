"""How `trl-cpo train` and `trl-cpo audit` parse: `--method` first, then one `TrlParser` with that method's config.

TRL's CLI builds one parser per command over that command's dataclasses; the scripts here pick the dataclasses by
method the same way. `read_method` reads `--method` (the command line's, else the `--config` YAML's), and the parser is
built over that method's own config class (`trl_cpo.methods.Method.config_class`), so every field and every default is
declared once, in the configs.

One config file may serve several methods (the recipes' YAML files switch with `--method`), so the parser also takes
the other methods' settings, each method's in an argument group of its own (`other_settings_types`: the fields of its
config class, defaulting to unset). They are listed by `--help` and ignored with one warning (`ignored_settings`),
while a misspelt key still fails.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import typing

from trl_cpo.methods import METHODS, Method

_UNSET = object()


def read_method(argv: list[str], default: str) -> str:
    """`--method` as the parser will read it: the command line's last one, else the `--config` YAML's `method` key,
    else `default`. A missing or malformed config file is left for the parser to report."""
    value = None
    for index, arg in enumerate(argv):
        if arg == "--method" and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith("--method="):
            value = arg.partition("=")[2]
    if value is None and "--config" in argv:
        index = argv.index("--config")
        path = argv[index + 1] if index + 1 < len(argv) else None
        if path and os.path.isfile(path):
            import yaml

            try:
                with open(path, encoding="utf-8") as f:
                    config = yaml.safe_load(f)
            except yaml.YAMLError:
                config = None
            if isinstance(config, dict):
                value = config.get("method")
    return default if value is None else str(value)


@functools.cache
def other_settings_types(method_name: str) -> tuple[type, ...]:
    """One dataclass per other method of the table: its settings (fields of its config class, same type and help,
    default None for unset) as an argument group. Fields `method_name`'s config class takes are left out."""
    taken = {f.name for f in dataclasses.fields(METHODS[method_name].config_class) if f.init}
    types = []
    for other in METHODS.values():
        names = [name for name in other.flags if name not in taken]
        if not names:
            continue
        taken.update(names)
        hints = typing.get_type_hints(other.config_class)
        source = {f.name: f for f in dataclasses.fields(other.config_class)}
        fields = [(n, hints[n], dataclasses.field(default=None, metadata=source[n].metadata)) for n in names]
        group = f"{other.title} settings (used by --method {other.name}; any other method ignores them)"
        types.append(
            dataclasses.make_dataclass(
                f"_{other.name}_settings",
                fields,
                namespace={"_argument_group_name": group, "__module__": __name__},
            )
        )
    return tuple(types)


def ignored_settings(method: Method, groups) -> str | None:
    """The warning naming the other methods' settings that the arguments set (values `method` pins are no news), or
    None."""
    ignored = {
        name: value
        for group in groups
        for name, value in vars(group).items()
        if value is not None and method.pinned.get(name, _UNSET) != value
    }
    if not ignored:
        return None
    settings = ", ".join(f"{name}={value!r}" for name, value in ignored.items())
    return f"method={method.name} does not use {settings}; ignoring them."


def parse(make_parser, argv: list[str] | None, default: str, **parse_kwargs) -> tuple[Method, tuple, str | None]:
    """Parse `argv` with `make_parser(method, other_settings_types)` for the method `--method` names.

    Returns the method's entry, the parser's outputs for its own dataclasses (then the remaining strings, if
    `parse_kwargs` asks for them), and `ignored_settings`'s warning. An unknown `--method` parses with `default`'s
    config, whose `--method` choices then refuse it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    name = read_method(argv, default)
    method = METHODS[name if name in METHODS else default]
    groups = other_settings_types(method.name)
    parser = make_parser(method, groups)
    outputs = parser.parse_args_and_config(argv, **parse_kwargs)
    first = len(parser.dataclass_types) - len(groups)
    own, parsed_groups, remaining = (
        outputs[:first],
        outputs[first : first + len(groups)],
        outputs[first + len(groups) :],
    )
    chosen = next((obj.method for obj in own if hasattr(obj, "method")), method.name)
    if chosen != method.name:  # argparse took an abbreviation of --method that `read_method` does not read
        raise ValueError(f"--method {chosen}: write the option in full, as --method {chosen}.")
    return method, (*own, *remaining), ignored_settings(method, parsed_groups)
