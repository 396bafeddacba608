"""`trl-cpo` command line: `trl-cpo train|audit|demo [options]`, shaped like the `trl` CLI.

Each subcommand is a module of `trl_cpo.scripts` with `main(argv: list[str] | None = None) -> int`, imported only when
that subcommand runs: `trl-cpo --help` loads neither torch nor transformers. `trl-cpo COMMAND --help` lists the
command's options (its `TrlParser` dataclasses; `--config file.yaml` works for all three).

`trl-cpo train` runs in the current process. For several processes or GPUs, launch the same module with accelerate:
`accelerate launch -m trl_cpo.scripts.train --config file.yaml` (or `recipes/cpo_llama3.py`, which calls it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import version

#: Subcommand -> (module with `main(argv)`, one-line help).
COMMANDS = {
    "train": (
        "trl_cpo.scripts.train",
        "Train with CPO, E-CPOC or the DPO baseline (a recipe config: trl-cpo train --config file.yaml).",
    ),
    "audit": (
        "trl_cpo.scripts.audit",
        "Measure how often a reference model prefers the rejected response of a dataset, before training.",
    ),
    "demo": (
        "trl_cpo.scripts.demo",
        "DPO vs CPO vs E-CPOC from a corrupted reference, on CPU, over seeds: which end in U.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-cpo",
        allow_abbrev=False,
        description="Constrained Preference Optimization (CPO, E-CPOC; arXiv:2605.20834) for Hugging Face TRL.",
        epilog="Run `trl-cpo COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"trl-cpo {version('trl-cpo')}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        # The command's own parser reads its options (and its --help): nothing is parsed here.
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    command_argv = argv[argv.index(args.command) + 1 :]
    module = importlib.import_module(COMMANDS[args.command][0])
    # The command's parser names itself after sys.argv[0] in its usage line ("usage: trl-cpo train ...").
    sys.argv = [f"trl-cpo {args.command}", *command_argv]
    return module.main(command_argv) or 0


if __name__ == "__main__":
    sys.exit(main())
