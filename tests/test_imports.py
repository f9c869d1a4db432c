"""Every module of the package imports alone in a fresh interpreter: no import cycle hides behind an order, and
importing one runs nothing (`audio_residual.__main__` runs the command line only as `python -m audio_residual`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import audio_residual

# modules of the one-pipeline layout: the listing below must reach them (pkgutil's walk skips folders without an
# __init__.py, such as clap/, so the files are listed instead)
EXPECTED = (
    "audio_residual.__main__", "audio_residual.workspace", "audio_residual.cli", "audio_residual.cli.options",
    "audio_residual.cli.study", "audio_residual.cli.tools", "audio_residual.data_processing.audio_config",
    "audio_residual.data_processing.sources", "audio_residual.clap.loading", "audio_residual.clap.text_encoders",
    "audio_residual.tasks.base", "audio_residual.tasks.classification", "audio_residual.tasks.retrieval",
    "audio_residual.tasks.loss", "audio_residual.methods.base", "audio_residual.methods.zeroshot",
    "audio_residual.methods.residual", "audio_residual.methods.lora", "audio_residual.methods.finetune",
    "audio_residual.methods.coop", "audio_residual.methods.tap", "audio_residual.methods.projection",
    "audio_residual.training.grid", "audio_residual.training.encoder", "audio_residual.experiments.study",
    "audio_residual.experiments.sweep", "audio_residual.evaluation.transfer", "audio_residual.analysis.distributed_stats",
)
GONE = ("audio_residual.retrieval", "audio_residual.baselines", "audio_residual.experiments.baselines",
        "audio_residual.experiments.residual", "audio_residual.experiments.transfer", "audio_residual.evaluation.metrics",
        "audio_residual.evaluation.retrieval")


def modules() -> list[str]:
    """Every module of the package, from its files (namespace folders such as clap/ included)."""
    root = Path(audio_residual.__file__).parent
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_first_in_a_fresh_interpreter():
    names = modules()
    assert set(EXPECTED) <= set(names), sorted(set(EXPECTED) - set(names))
    assert not set(GONE) & set(names), sorted(set(GONE) & set(names))
    # one interpreter per module, but each only imports: a cycle fails with ImportError on the module that
    # closes it; `-X importtime` is not needed, the order is what matters. A module that runs something on
    # import (argparse's SystemExit, say) fails too.
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('audio_residual')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as error:\n"
        "        failed.append(f'{name}: {error}')\n"
        "    except SystemExit as exit_:\n"
        "        failed.append(f'{name}: exited with {exit_.code} on import')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usage:" not in result.stderr and not result.stdout.strip(), result.stdout + result.stderr
