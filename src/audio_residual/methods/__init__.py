"""Every method behind one interface (`methods.base.Method`), in its tasks' registries (`REGISTRIES[task]`).

A new method is one module here (its algorithm, its options and `@register`) and one line below (the registry
keeps this order: tables list the methods in it); the study, `--methods`, k-shot runs, transfer and the report
then include it.
"""

# isort: off
from audio_residual.methods import zeroshot  # noqa: F401 — importing a method's module registers it
from audio_residual.methods import linear_probe  # noqa: F401
from audio_residual.methods import contrastive_adapter  # noqa: F401
from audio_residual.methods import tip_adapter  # noqa: F401
from audio_residual.methods import coop  # noqa: F401
from audio_residual.methods import lora  # noqa: F401
from audio_residual.methods import finetune  # noqa: F401
from audio_residual.methods import residual  # noqa: F401
from audio_residual.methods import projection  # noqa: F401
from audio_residual.methods import tap  # noqa: F401
# isort: on
from audio_residual.methods.base import (
    REGISTRIES,
    Context,
    Method,
    default_methods,
    get,
    register,
    registry,
)

__all__ = ["REGISTRIES", "Context", "Method", "default_methods", "get", "register", "registry"]
