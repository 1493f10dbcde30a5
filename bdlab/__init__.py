"""bdlab: a laboratory for neural backdoors in image classifiers."""

__version__ = "0.1.0"
