"""Audio-ResiDual: does ResiDual spectral reweighting adapt CLAP as well as a linear probe?"""

__version__ = "0.1.0"
