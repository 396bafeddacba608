"""The one place the commands get matplotlib from: plotting is the optional `plots` extra, not a core dependency."""

from __future__ import annotations

PLOTS_EXTRA_HINT = "pip install 'trl-cpo[plots]'"


def require_matplotlib():
    """Return `matplotlib.pyplot` on the non-interactive Agg backend (the commands write image files).

    Raises `ImportError` naming the extra to install when matplotlib is missing.
    """
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            f"Plotting needs matplotlib, which trl-cpo installs only with its 'plots' extra: {PLOTS_EXTRA_HINT} "
            "(or pip install matplotlib)."
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
