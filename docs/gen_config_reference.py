"""MkDocs hook: the configuration reference, generated from the config dataclasses' `help` metadata.

A page line ``<!-- config-reference: CPOConfig -->`` (any class exported by `trl_cpo`) is replaced by a table of the
fields that the class adds to `trl.DPOConfig`, or whose default or help differs from it: name, type, default,
DPOConfig's default and help. Nothing is copied by hand, so the table follows the code.

Used through ``hooks:`` in ``mkdocs.yml``; ``python docs/gen_config_reference.py`` prints the tables.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys

MARKER = re.compile(r"^<!-- config-reference: (\w+) -->[ \t]*$", re.MULTILINE)
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _type_name(annotation) -> str:
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(field: dataclasses.Field):
    from trl_cpo._config_utils import field_default  # imported late: the hook puts the repo on sys.path first

    return field_default(field)


def _code(value) -> str:
    return "(required)" if value is dataclasses.MISSING else f"`{value!r}`"


def differing_fields(config_cls) -> list[tuple[dataclasses.Field, dataclasses.Field | None]]:
    """(field, DPOConfig's field or None) for each field `config_cls` adds to DPOConfig or changes, in class order."""
    from trl import DPOConfig

    base = {field.name: field for field in dataclasses.fields(DPOConfig)}
    rows = []
    for field in dataclasses.fields(config_cls):
        if not field.init:
            continue
        dpo_field = base.get(field.name)
        if dpo_field is not None and (
            _default(dpo_field) == _default(field) and dpo_field.metadata.get("help") == field.metadata.get("help")
        ):
            continue
        rows.append((field, dpo_field))
    # New fields first (what the method adds), then the DPO fields it changes.
    return sorted(rows, key=lambda row: row[1] is not None)


def render(config_cls) -> str:
    """Markdown table of `config_cls`'s own and changed fields."""
    lines = [
        "| Field | Type | Default | `DPOConfig` default | Description |",
        "| --- | --- | --- | --- | --- |",
    ]
    for field, dpo_field in differing_fields(config_cls):
        dpo_default = "new field" if dpo_field is None else _code(_default(dpo_field))
        help_text = field.metadata.get("help", "")
        choices = field.metadata.get("choices")
        if choices:
            help_text += f" Choices: {', '.join(f'`{c}`' for c in choices)}."
        lines.append(
            f"| `{field.name}` | `{_type_name(field.type)}` | {_code(_default(field))} | {dpo_default} | "
            f"{_cell(help_text)} |"
        )
    return "\n".join(lines)


def _config_class(name: str):
    if _REPO not in sys.path:
        sys.path.insert(0, _REPO)
    module = importlib.import_module("trl_cpo")
    config_cls = getattr(module, name, None)
    if config_cls is None or not dataclasses.is_dataclass(config_cls):
        raise ValueError(f"config-reference: trl_cpo has no config dataclass named {name!r}")
    return config_cls


def on_page_markdown(markdown: str, page=None, config=None, files=None, **kwargs) -> str:
    """MkDocs hook event: replace each config-reference marker with its table."""
    if "config-reference:" not in markdown:
        return markdown
    try:
        return MARKER.sub(lambda match: render(_config_class(match.group(1))), markdown)
    except ValueError as error:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{getattr(getattr(page, 'file', None), 'src_path', 'page')}: {error}") from error


if __name__ == "__main__":
    for class_name in sys.argv[1:] or ["CPOConfig", "ECPOCConfig"]:
        print(f"## {class_name}\n\n{render(_config_class(class_name))}\n")
