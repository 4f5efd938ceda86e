"""The cluster planner: how long, on which layout, at what MFU, drawing how many megawatts, at what cost.

Public API:
  cli.main(argv) -> int                      `gigatrain plan ...`
  layout.auto_layout(model_args, world_size, seq_len, global_batch, gpu) -> dict
                                             the layout `gigatrain train --parallel.auto=true` uses
  catalog.peak_bf16_flops_for_device(name)   the MFU denominator of a CUDA device
  planner.make_plan(PlanSpec) -> dict        what `gigatrain plan --json` prints
  model.evaluate(Workload, Layout, Accelerator, Efficiency) -> Estimate
"""
