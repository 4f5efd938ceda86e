"""The cluster planner library: how long, on which layout, at what MFU, drawing how many megawatts.

The trainer and the metrics use it; the `gigatrain plan` application lives in plan.app (which
this library never imports).

Public API:
  layout.auto_layout(model_args, world_size, seq_len, global_batch, gpu) -> Layout
                                             the layout `gigatrain train --parallel.auto=true` uses
                                             (the five degrees, micro-batch, schedule, recompute, ep)
  catalog.peak_bf16_flops_for_device(name)   the MFU denominator of a CUDA device
  planner.make_plan(PlanSpec) -> dict        what `gigatrain plan --json` prints
  costs.estimate(Workload, Layout, Accelerator, Efficiency) -> Estimate
"""
