"""Parallelism applied from outside to an unmodified model.

`parallelize` follows the order that composes with PyTorch's distributed stack:

    pipeline split -> tensor/sequence parallel -> context parallel -> float8 linears -> expert parallel
        -> activation checkpointing -> compile -> FSDP2 -> initialise this rank's shards

Expert parallelism comes before FSDP, which shards the experts' (already ep-split) DTensors
further over their own data-parallel mesh, and after tensor parallelism, whose plan leaves
MoE layers whole on every tp rank (docs/moe.md).

A model built on the meta device (every multi-process run) allocates nothing until its
shards exist, so no rank ever holds the whole model; each shard is then filled with the
very numbers one process would draw for it (`init_parameter`, one random stream per
parameter name). `parallelize` returns a `ParallelModel`: the model parts this rank holds and how to run a forward
and backward pass over this rank's share of a batch under the layout. One process is the
layout with every degree 1, and goes through the same code.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from gigatrain.config import Config
from gigatrain.models.transformer import init_parameter, parameter_generator
from gigatrain.parallel.context import apply_cp, shard_rope, shard_sequence
from gigatrain.parallel.device import autocast
from gigatrain.parallel.expert import apply_ep, moe_layers
from gigatrain.parallel.float8 import apply_float8
from gigatrain.parallel.fsdp import apply_fsdp
from gigatrain.parallel.mesh import ParallelDims
from gigatrain.parallel.tensor import apply_tp, loss_context, parallel_loss


# Op-level selective checkpointing keeps the outputs of these ops (torchtitan's choice): the
# matmuls and attention, which cost FLOPs to redo, and the reduce-scatters of sequence
# parallelism and all-to-alls of expert parallelism, which cost communication; every other op
# (norms, rotary, SwiGLU's activation and product, residual adds: cheap, memory-bound) is
# recomputed in the backward. This is what the
# planner's "selective" assumes (plan.costs.activation_elements).
_SELECTIVE_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_mm.default,  # float8's matmuls (train.float8)
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    # Expert parallelism's token exchange (all-to-all): communication, kept rather than redone.
    torch.ops._c10d_functional.all_to_all_single.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SELECTIVE_SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Checkpoint every block: 'full' keeps only its input and recomputes the whole block in
    the backward; 'selective' also keeps its matmul and attention outputs and recomputes only
    the cheap ops between them."""
    if mode == "none":
        return
    options = {"context_fn": partial(create_selective_checkpoint_contexts, _selective_policy)} if mode == "selective" else {}
    for name, block in list(model.layers.named_children()):
        # The wrapper's state-dict hooks strip its prefix, so checkpoint names are unchanged.
        model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False, **options))


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place: the blocks share one graph, names stay unchanged, and
    compile time does not grow with depth."""
    for block in model.layers.values():
        block.compile()


def _sum_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return parallel_loss(logits, targets, reduction="sum")


def _local(value: torch.Tensor) -> torch.Tensor:
    """A loss computed under loss parallel is a replicated DTensor; its value is the same everywhere."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def _by_mesh(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`tensors` in groups of one mesh each (plain tensors: one group), in first-seen order."""
    groups: dict[DeviceMesh | None, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.device_mesh if isinstance(tensor, DTensor) else None, []).append(tensor)
    return list(groups.values())


class ParallelModel:
    """This rank's model parts under a layout, and the passes that run them."""

    def __init__(self, parts: list[nn.Module], dims: ParallelDims, mesh: dict[str, DeviceMesh] | None,
                 device: torch.device, dtype: torch.dtype | None, stage_indices: list[int]):
        self.parts, self.dims, self.mesh = parts, dims, mesh
        self.device, self.dtype = device, dtype
        self.has_first_stage = 0 in stage_indices
        self.has_last_stage = dims.num_stages - 1 in stage_indices
        self.schedule = self.eval_schedule = self.tied_group = None
        stages_run_forward_first = False
        if dims.pp > 1:
            # Imported where a pipeline is built: torch's pipelining costs every other process
            # most of a second at each start and restart (bench/startup.py).
            from torch.distributed.pipelining import PipelineStage

            from gigatrain.parallel.pipeline import build_schedule, tied_weight_group

            pp_mesh = mesh["pp"]
            self.schedule = build_schedule(parts, stage_indices, dims, pp_mesh, device, parallel_loss, dims.microbatches)
            self.eval_schedule = build_schedule(parts, stage_indices, dims, pp_mesh, device, _sum_loss, dims.microbatches)
            if parts[0].args.tie_embeddings:
                self.tied_group = tied_weight_group(dims)
            stages_run_forward_first = hasattr(PipelineStage, "_forward_metadata_inference")
        self.moe_layers = moe_layers(*parts)
        self.moe_layer_ids = [i for i in range(parts[0].args.n_layers) if parts[0].args.is_moe_layer(i)]
        for _, moe in self.moe_layers:
            # The loop divides each micro-batch's loss by their number; a schedule scales the gradients.
            moe.aux_grad_scale = 1.0 if self.schedule is not None else 1.0 / dims.microbatches
            if dims.cp > 1:
                moe.sequence_reduce = partial(funcol.all_reduce, reduceOp="sum", group=mesh["cp"])
            if stages_run_forward_first:
                # torch >= 2.12's stages infer their shapes at the first step by running their
                # forward once, with gradients, on the first micro-batch (first stage) or on empty
                # tensors (the others): routing that is not the batch's. (Earlier versions infer
                # on meta tensors without gradients, which the layer does not count.)
                moe.uncounted_forwards = 1

    # -- coordinates -----------------------------------------------------------------------
    def rank_in(self, axis: str) -> int:
        return self.mesh[axis].get_local_rank() if self.mesh is not None else 0

    @property
    def dp_rank(self) -> int:
        return self.rank_in("dp")

    @property
    def holds_loss(self) -> bool:
        """One rank per (data-parallel, context-parallel) replica reports its loss: the one on
        the last pipeline stage, first tensor-parallel rank (its tp peers hold copies)."""
        return self.has_last_stage and self.rank_in("tp") == 0

    def parameters(self) -> list[nn.Parameter]:
        return [p for part in self.parts for p in part.parameters()]

    def _tied_copy(self) -> nn.Parameter | None:
        """This rank's copy of a pipeline's tied embedding weight (first or last stage), if any."""
        if self.tied_group is None:
            return None
        return next(part.tok_embeddings.weight for part in self.parts if part.tok_embeddings is not None)

    def _sum_tied_gradients(self) -> None:
        """Under a pipeline the first stage's embeddings and the last stage's head each hold a
        copy of the tied weight, with the gradient of their own use: give both the sum."""
        copy = self._tied_copy()
        if copy is None:
            return
        grad = copy.grad
        dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=self.tied_group)

    def _lay_out_gradients(self) -> None:
        """Give each DTensor gradient its parameter's placements, as FSDP does for the
        parameters it shards. Tensor parallelism alone leaves the sequence-parallel norms'
        replicated weights a partial gradient (each rank's share of the sequence) and the
        vocabulary-sharded embeddings a replicated one; torch 2.11 clips a partial gradient
        wrongly, and the tied copies' sum needs the head's layout."""
        for param in self.parameters():
            grad = param.grad
            if isinstance(grad, DTensor) and grad.placements != param.placements:
                param.grad = grad.redistribute(grad.device_mesh, param.placements)

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    # -- passes ----------------------------------------------------------------------------
    def _shard(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        if self.dims.cp > 1:
            cp_mesh = self.mesh["cp"]
            inputs, targets = shard_sequence(inputs, cp_mesh), shard_sequence(targets, cp_mesh)
        return inputs, targets

    def _pipeline_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[tuple, torch.Tensor | None]:
        """What a pipeline schedule takes on this rank: the inputs where the first stage runs,
        the targets where the last does (torch 2.11 refuses inputs on any other stage)."""
        return (inputs,) if self.has_first_stage else (), targets if self.has_last_stage else None

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Accumulate the gradient of the mean loss over this rank's [local_batch, seq] share;
        returns that mean (meaningful where `holds_loss`)."""
        inputs, targets = self._shard(inputs, targets)
        with loss_context(self.dims.tp), autocast(self.device, self.dtype):
            if self.schedule is not None:
                losses: list[torch.Tensor] = []
                args, target = self._pipeline_batch(inputs, targets)
                self.schedule.step(*args, target=target, losses=losses)
                self._lay_out_gradients()
                self._sum_tied_gradients()
                if not self.has_last_stage:
                    return torch.zeros((), device=self.device)
                return torch.stack([_local(loss).detach() for loss in losses]).mean()
            n_micro, model = self.dims.microbatches, self.parts[0]
            total = torch.zeros((), device=self.device)
            for index, (micro_inputs, micro_targets) in enumerate(zip(inputs.chunk(n_micro), targets.chunk(n_micro))):
                if self.dims.fsdp:
                    # Accumulate locally; reduce-scatter once, in the last micro-batch's backward.
                    model.set_requires_gradient_sync(index == n_micro - 1)
                loss = parallel_loss(model(micro_inputs), micro_targets) / n_micro
                loss.backward()
                total += _local(loss).detach()
            self._lay_out_gradients()
            return total

    @torch.no_grad()
    def loss_sum(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed loss over this rank's share of an evaluation batch (targets of -100 are padding)."""
        inputs, targets = self._shard(inputs, targets)
        with loss_context(self.dims.tp), autocast(self.device, self.dtype):
            if self.eval_schedule is not None:
                losses: list[torch.Tensor] = []
                args, target = self._pipeline_batch(inputs, targets)
                self.eval_schedule.eval(*args, target=target, losses=losses)
                if not self.has_last_stage:
                    return torch.zeros((), device=self.device)
                return torch.stack([_local(loss) for loss in losses]).sum()
            total = torch.zeros((), device=self.device)
            for micro_inputs, micro_targets in zip(inputs.chunk(self.dims.microbatches), targets.chunk(self.dims.microbatches)):
                total += _local(_sum_loss(self.parts[0](micro_inputs), micro_targets))
            return total

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the whole model's gradient: DTensor shards are reduced to their
        full norm, mesh by mesh (experts live on another mesh than the rest, and DTensor
        refuses ops across meshes; plain tensors, the same on every rank, count once), and
        pipeline stages add up their squares (a tied weight's once: the last stage's copy is
        left out)."""
        params = [p for p in self.parameters() if p.grad is not None]
        repeated = self._tied_copy() if self.has_last_stage else None
        grads_by_mesh = _by_mesh([p.grad for p in params if p is not repeated])
        norms = [_local(torch.nn.utils.get_total_norm(grads)) for grads in grads_by_mesh] or [torch.zeros((), device=self.device)]
        norm = norms[0] if len(norms) == 1 else torch.stack(norms).pow(2).sum().sqrt()
        if self.dims.pp > 1:
            squared = norm.pow(2)
            dist.all_reduce(squared, group=self.mesh["pp"].get_group())
            norm = squared.sqrt()
        for group in _by_mesh(params):
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
        return norm

    # The MoE layers' inputs under tensor parallelism are replicated over tp (feed_forward gets
    # Replicate() input): tp peers route the same tokens and only one of them may count them.
    moe_tokens_split_over_tp = False

    def expert_statistics(self) -> torch.Tensor | None:
        """The router statistics of the step just run, summed over the whole global batch, the
        same on every rank, then reset: [MoE layers of the whole model, experts + 2], per layer
        the (token, choice) pairs routed to each expert, the sum of the per-sequence balance
        losses and their number of sequences (0 without an auxiliary loss). None: a dense model.

        Every rank that routed other tokens of the step adds its counts (data-parallel replicas
        and shards, context-parallel shards: the sum over the world of the rows it holds);
        pipeline stages fill the rows of their own layers; tensor-parallel peers, which route
        the same tokens, count once. One all-reduce of a small tensor per step."""
        if not self.moe_layer_ids:
            return None
        n_experts = self.parts[0].args.n_experts
        row = {layer: index for index, layer in enumerate(self.moe_layer_ids)}
        stats = torch.zeros(len(self.moe_layer_ids), n_experts + 2, device=self.device)
        counts_here = self.moe_tokens_split_over_tp or self.rank_in("tp") == 0
        for layer, moe in self.moe_layers:
            if counts_here:
                stats[row[layer], :n_experts] = moe.tokens_per_expert
                stats[row[layer], n_experts:] = moe.aux_loss_sum
            moe.reset_statistics()
        if self.mesh is not None:
            dist.all_reduce(stats)
        return stats

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum `values` over the ranks that hold a loss (one per data/context replica)."""
        if self.mesh is None:
            return values
        values = values if self.holds_loss else torch.zeros_like(values)
        dist.all_reduce(values)
        return values


def plain_name(name: str) -> str:
    """A parameter's name in the whole model, without the wrappers' prefixes."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


@torch.no_grad()
def materialize(part: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate a meta-device (possibly sharded) part on `device` and initialise it. A sharded
    parameter's whole value is drawn on the device one parameter at a time and this rank
    keeps its slice: exact, with a peak of one full parameter, and free of DTensor's random
    ops (which on CPU give every shard the same numbers)."""
    part.to_empty(device=device)
    part.tie_weights()
    for name, param in part.named_parameters():
        name = plain_name(name)
        generator = parameter_generator(seed, name, device)
        if not isinstance(param, DTensor):
            init_parameter(name, param, part.args, generator)
            continue
        full = torch.empty(param.shape, dtype=param.dtype, device=device)
        init_parameter(name, full, part.args, generator)
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        local = param.to_local()
        assert tuple(local.shape) == tuple(shape), f"{name}: local shard {tuple(local.shape)} != {shape}"
        local.copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
    part.init_buffers()


def parallelize(model: nn.Module, dims: ParallelDims, mesh: dict[str, DeviceMesh] | None, cfg: Config,
                device: torch.device, dtype: torch.dtype | None) -> ParallelModel:
    on_meta = model.rope_cos.is_meta
    stage_indices, parts = [0], [model]
    if dims.pp > 1:
        from gigatrain.parallel.pipeline import split_model

        stage_indices, parts = split_model(model, dims, mesh["pp"].get_local_rank())
    for part in parts:
        if not on_meta:
            part.to(device)
        if dims.tp > 1:
            apply_tp(part, mesh["tp"])
            part.tie_weights()  # the embeddings and the head are sharded alike: Shard(0) of [vocab, d_model]
        if dims.cp > 1:
            apply_cp(part, mesh["cp"], cfg.data.seq_len, device)
        apply_float8(part, cfg.train, fsdp_shards=mesh["fsdp"].size() if dims.fsdp else 1)
        if dims.ep > 1:
            apply_ep(part, mesh["ep"])
        apply_activation_checkpointing(part, dims.activation_checkpointing)
        if cfg.train.compile:
            apply_compile(part)
        if dims.fsdp:
            # Under a pipeline, the weights a stage gathers for its forward are needed again
            # by its backward a few microbatches later: keep them gathered.
            apply_fsdp(part, mesh["fsdp"], param_dtype=dtype, reshard_after_forward=dims.pp == 1,
                       efsdp_mesh=mesh["efsdp"] if dims.ep > 1 else None)
        if on_meta:
            materialize(part, device, cfg.train.seed)
        if dims.cp > 1:
            shard_rope(part, mesh["cp"], cfg.data.seq_len)
    return ParallelModel(parts, dims, mesh, device, dtype, stage_indices)
