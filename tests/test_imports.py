"""Every module of the package imports alone in a fresh interpreter: no import cycle hides behind an order."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import audio_residual


def test_every_module_imports_first_in_a_fresh_interpreter():
    names = [m.name for m in pkgutil.walk_packages(audio_residual.__path__, "audio_residual.")]
    # one interpreter per module, but each only imports: a cycle fails with ImportError on the module that
    # closes it; `-X importtime` is not needed, the order is what matters
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
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
