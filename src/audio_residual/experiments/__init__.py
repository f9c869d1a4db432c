"""Orchestration above the methods: the one study runner for every task (`study.Study`), its configuration,
ResiDual's grid sweeps (W&B agents) and the k-shot protocols."""
