"""`trl-cpo demo`: DPO, CPO and E-CPOC from a misaligned reference, on a tiny model on CPU, over several seeds.

A small-scale version of the misaligned-reference experiment of arXiv:2605.20834 (Appendix A.2), offline. Modules:

- `task`: the synthetic preference task, the corrupted reference's SFT data, tokenization and log-probs;
- `optimum`: the population optimum of each loss under label noise (the table's `predicted` column);
- `run`: the arguments (`DemoArguments`, parsed by `trl.TrlParser`), up-front checks and the experiment loop;
- `report`: intervals across seeds, the tables, the plots and `results.json`.

Not related to TRL's Contrastive Preference Optimization (``trl.experimental.cpo``): same acronym, different method.
"""


def main(argv=None) -> int:
    """`trl-cpo demo`; see `trl_cpo.scripts.demo.run.main`."""
    from .run import main as run_main

    return run_main(argv)


__all__ = ["main"]
