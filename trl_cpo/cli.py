"""`trl-cpo` command line: `trl-cpo demo ...` and `trl-cpo audit ...`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("trl_cpo.demo", "Train DPO, CPO and E-CPOC from a corrupted reference on CPU; see which end in U."),
    "audit": (
        "trl_cpo.scripts.audit",
        "Measure how often a reference model prefers the rejected response of a dataset.",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: trl-cpo {demo,audit} [options]   (trl-cpo COMMAND --help for its options)", ""]
        lines += [f"  {name:<6} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("\n".join(lines), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
