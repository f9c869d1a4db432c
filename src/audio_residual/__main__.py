"""`python -m audio_residual COMMAND ...`: the command line as a module (what `torchrun -m` launches)."""

from audio_residual.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
