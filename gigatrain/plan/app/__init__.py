"""The planner as an application: `gigatrain plan` (cli), its tables (report), sweeps,
calibration from measured runs and the comparison with published runs.

It stands on the library in gigatrain.plan; the library never imports it.
"""
