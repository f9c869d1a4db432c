"""Every method behind one interface (`methods.base.Method`), in its task's registry (`REGISTRIES[task]`;
`REGISTRY` is classification's).

A new method is one module here and one line below (the registry keeps this order: tables list the
methods in it); the study, `--methods`, k-shot runs, transfer and the report then include it. ResiDual
is trained by the sweep and its nested choice (`experiments.residual`).
"""

# isort: off
from audio_residual.methods import zeroshot  # noqa: F401 — importing a method's module registers it
from audio_residual.methods import linear_probe  # noqa: F401
from audio_residual.methods import contrastive_adapter  # noqa: F401
from audio_residual.methods import tip_adapter  # noqa: F401
from audio_residual.methods import coop  # noqa: F401
from audio_residual.methods import lora  # noqa: F401
from audio_residual.methods import finetune  # noqa: F401
from audio_residual.methods import retrieval  # noqa: F401 — the retrieval task's methods (REGISTRIES["retrieval"])
# isort: on
from audio_residual.methods.base import REGISTRIES, REGISTRY, Context, Method, get, register

DEFAULT_METHODS = tuple(name for name, method in REGISTRY.items() if method.by_default)

__all__ = ["DEFAULT_METHODS", "REGISTRIES", "REGISTRY", "Context", "Method", "get", "register"]
