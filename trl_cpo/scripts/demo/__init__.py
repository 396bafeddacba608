"""`trl-cpo demo` (transitional: the implementation still lives in `trl_cpo.demo`)."""

from trl_cpo.demo import main

__all__ = ["main"]
