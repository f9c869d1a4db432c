"""Evaluation: metrics, zero-shot by fold, the keyed results store, paired comparison, plots and the report.

Import from the submodules (`evaluation.metrics`, `evaluation.store`, `evaluation.report`): tasks use the
metrics and the store uses the tasks, so this package imports nothing eagerly, which would close a cycle.
"""
