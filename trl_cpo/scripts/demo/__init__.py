"""`trl-cpo demo`: DPO, CPO and E-CPOC from a misaligned reference, on a tiny model on CPU, over several seeds.

A small-scale version of the misaligned-reference experiment of arXiv:2605.20834 (Appendix A.2), offline. Modules:

- `task`: the synthetic preference task, the corrupted reference's SFT data, tokenization and log-probs;
- `optimum`: the population optimum of each loss under label noise (the table's `predicted` column);
- `rows`: the rows of the experiment (TRL's DPOTrainer, or a `trl_cpo.methods.METHODS` entry at settings of its own),
  their configs, trainers and targets;
- `args`: the arguments (`DemoArguments`) and every check made before anything trains;
- `measure`: held-out accuracy and U-fraction;
- `run`: the experiment loop and `main`;
- `report`, `stats`, `plots`: numbers across seeds, the tables, `results.json` and the figures.

Not related to TRL's Contrastive Preference Optimization (``trl.experimental.cpo``): same acronym, different method.
"""


def main(argv=None) -> int:
    """`trl-cpo demo`; see `trl_cpo.scripts.demo.run.main`."""
    from .run import main as run_main

    return run_main(argv)


__all__ = ["main"]
