"""Orchestration above the methods: the study, the baselines runner, ResiDual per fold, sweeps, protocols, transfer."""
