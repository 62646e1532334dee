"""Analytic figures of a run from its configuration alone (no measurement): parameters and model
FLOPs (``flops``), bytes communicated per step (``comm``). Used to plan runs and to analyze them.

Imports only ``ftscale.study``.
"""
