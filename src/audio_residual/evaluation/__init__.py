"""Evaluation: the keyed results store, the paired comparison with the baseline, zero-shot by fold, transfer
(retention), plots and the one report writer. The metrics themselves belong to their task (`tasks/`).

Import from the submodules (`evaluation.store`, `evaluation.report`, `evaluation.transfer`).
"""
