"""`trl-cpo audit` (transitional: the implementation still lives in `trl_cpo.audit`)."""

from trl_cpo.audit import main

__all__ = ["main"]
