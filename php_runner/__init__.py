"""php-run: a faithful PHP re-implementation with an ablation, audit and reproducibility runner."""

__version__ = "0.1.0"
