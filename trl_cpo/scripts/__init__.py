"""The `trl-cpo` subcommands, shaped like TRL's own `trl/scripts/`: each module parses dataclass arguments with
`TrlParser` (so `--config file.yaml` works) and exposes `main(argv: list[str] | None = None) -> int`."""
