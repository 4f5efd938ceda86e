"""Published large training runs, and the planner's prediction of each.

Each run is reproduced from what its paper states (model shape, sequence, batch, GPU kind and
count, parallel degrees); the planner picks what the paper leaves open (micro-batch size,
pipeline schedule and its virtual stages, recompute where not stated) and predicts the figure
the paper reports. `gigatrain plan --published` prints the table; tests/plan holds it to the
tolerance below; docs/planner.md explains each miss.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from gigatrain.models.presets import get_preset
from gigatrain.models.transformer import ModelArgs
from gigatrain.plan.catalog import get_accelerator
from gigatrain.plan.layout import Constraints, best_layout
from gigatrain.plan.costs import Efficiency, Estimate, Workload

TOLERANCE = 0.15  # relative error the planner aims for on every published run

LLAMA3 = "Llama 3 herd paper, arXiv:2407.21783, table 4"
MEGATRON = "Narayanan et al. 2021, arXiv:2104.04473 (SC21), table 1"
TORCHTITAN = "torchtitan docs/performance.md (FSDP2 on 64 A100 80GB, 2024)"
# torchtitan does not state its A100 cluster's network. FSDP2 moves 104 GB per GPU per step for
# Llama 2 13B, which 200 Gb/s HDR cannot carry in the measured 3.8 s, so the fabric was faster:
# we assume 400 Gb/s per GPU, the fabric Meta describes for its H100 clusters (an assumption).
TORCHTITAN_FABRIC = {"scaleout_bw_gbs": 50.0}
NEMO_B200 = ("NVIDIA NeMo Framework performance summary, NeMo 25.02, DGX-B200, FP8 per-tensor current scaling "
             "(docs.nvidia.com/nemo-framework/user-guide/latest/performance/performance_summary.html)")
NEMO_GB200 = ("NVIDIA NeMo Framework performance summary, NeMo 25.04, DGX-GB200, FP8 per-tensor current scaling "
              "(docs.nvidia.com/nemo-framework/user-guide/latest/performance/performance_summary.html)")
DEEPSEEK_V3 = "DeepSeek-V3 technical report, arXiv:2412.19437: table 1 and sec. 3.1-3.2, 4.2"
# H800: an H100 whose NVLink is cut to 400 GB/s bidirectional (DeepSeek-V3 report, sec. 3.2.2:
# "NVLink offers a bandwidth of 160 GB/s" achieved, IB 50 GB/s per GPU), same tensor cores.
H800 = {"scaleup_bw_gbs": 200.0}


def gpt(layers: int, hidden: int, heads: int) -> ModelArgs:
    """A GPT-3-style model of Megatron's table 1 (vocabulary 51,200, sequence 2,048). Its GELU MLP
    of 4h is written as a SwiGLU of hidden 8h/3: the same parameters and FLOPs per token."""
    return ModelArgs(n_layers=layers, d_model=hidden, n_heads=heads, n_kv_heads=heads,
                     ffn_hidden=round(8 * hidden / 3), vocab_size=51200, max_seq_len=2048, tie_embeddings=True)


LLAMA2_13B = ModelArgs(n_layers=40, d_model=5120, n_heads=40, n_kv_heads=40, ffn_hidden=13824, vocab_size=32000,
                       max_seq_len=4096)
# DeepSeek-V3 (arXiv:2412.19437, sec. 4.2): 61 layers, the first 3 dense (hidden 18,432), then 256
# routed experts of hidden 2,048, 8 per token, and 1 shared; 671B total, 37B active. Multi-head
# latent attention is not modeled: it is written as plain multi-head attention of 128 heads over
# d_model 7,168 (205M weights per layer against MLA's 187M, and about a third of MLA's attention
# FLOPs, whose heads are 192 wide for QK^T and 128 for AV); the multi-token-prediction module is left out.
DEEPSEEK_V3_ARGS = ModelArgs(n_layers=61, d_model=7168, n_heads=128, n_kv_heads=128, ffn_hidden=18432,
                             vocab_size=129280, max_seq_len=4096, n_experts=256, top_k=8, expert_hidden=2048,
                             n_shared_experts=1, n_dense_layers=3, router_score="sigmoid")


@dataclass(frozen=True)
class PublishedRun:
    name: str
    source: str
    model: ModelArgs
    gpu: str
    gpus: int
    seq_len: int
    global_batch: int  # sequences
    # "mfu" (PaLM-convention MFU), "megatron_tflops" (Megatron's eq. 3 TFLOP/s per GPU) or
    # "tokens_per_gpu_s" (training tokens per second per GPU)
    metric: str
    published: float
    degrees: dict = field(default_factory=dict)  # the paper's parallel degrees (config names)
    activation_checkpointing: str | None = None  # as stated by the paper; None: the planner picks
    pp_schedule: str | None = None  # pipeline schedule the paper used (PyTorch's name); None: the planner picks
    even_stages: bool = True
    flash_attention: bool = True
    sequence_parallel: bool = True
    op_level_selective: bool = True  # False: the run's stack recomputes as Megatron does (plan.costs.Workload)
    catalog_overrides: dict = field(default_factory=dict)  # hardware figures the source states differently
    precision: str = "bf16"  # which peak the matmuls run at (plan.costs.Workload)
    efficiency_overrides: dict = field(default_factory=dict)  # what the run's software does that the defaults do not
    known_miss: str = ""  # why the planner misses this run by more than TOLERANCE (docs/planner.md)
    note: str = ""


def megatron_flops_per_step(run: PublishedRun) -> float:
    """Megatron-LM's eq. 3, the count behind its reported TFLOP/s: it includes the forward
    replayed by full activation recompute, 96 B s l h^2 (1 + s/6h + V/16lh)."""
    m, b, s = run.model, run.global_batch, run.seq_len
    h, layers = m.d_model, m.n_layers
    return 96 * b * s * layers * h * h * (1 + s / (6 * h) + m.vocab_size / (16 * layers * h))


def _megatron(params: str, layers: int, hidden: int, heads: int, tp: int, pp: int, gpus: int, batch: int,
              tflops: float) -> PublishedRun:
    dp = gpus // (tp * pp)
    return PublishedRun(name=f"GPT {params} on {gpus} A100", source=MEGATRON, model=gpt(layers, hidden, heads),
                        gpu="a100", gpus=gpus, seq_len=2048, global_batch=batch, metric="megatron_tflops",
                        published=tflops, degrees={"tp": tp, "pp": pp, "cp": 1, "dp_shard": 1, "dp_replicate": dp},
                        activation_checkpointing="full", flash_attention=False,
                        pp_schedule="Interleaved1F1B" if pp > 1 else None,
                        sequence_parallel=False)


PUBLISHED_RUNS: list[PublishedRun] = [
    PublishedRun(name="Llama 3 405B on 8,192 H100", source=LLAMA3, model=get_preset("llama3-405b"), gpu="h100",
                 gpus=8192, seq_len=8192, global_batch=2048, metric="mfu", published=0.43, pp_schedule="Interleaved1F1B",
                 degrees={"tp": 8, "cp": 1, "pp": 16, "dp_shard": 64, "dp_replicate": 1}, even_stages=False,
                 op_level_selective=False),
    PublishedRun(name="Llama 3 405B on 16,384 H100", source=LLAMA3, model=get_preset("llama3-405b"), gpu="h100",
                 gpus=16384, seq_len=8192, global_batch=2048, metric="mfu", published=0.41, pp_schedule="Interleaved1F1B",
                 degrees={"tp": 8, "cp": 1, "pp": 16, "dp_shard": 128, "dp_replicate": 1}, even_stages=False,
                 op_level_selective=False),
    PublishedRun(name="Llama 3 405B, 131k context, 16,384 H100", source=LLAMA3, model=get_preset("llama3-405b"),
                 gpu="h100", gpus=16384, seq_len=131072, global_batch=128, metric="mfu", published=0.38, pp_schedule="Interleaved1F1B",
                 degrees={"tp": 8, "cp": 16, "pp": 16, "dp_shard": 8, "dp_replicate": 1}, even_stages=False,
                 op_level_selective=False,
                 known_miss="attention (57% of the FLOPs at 131k) ran at ~22% of peak in Meta's context-parallel "
                            "kernels, not the 45% the catalog assumes for flash attention on H100"),
    _megatron("1.7B", 24, 2304, 24, 1, 1, 32, 512, 137),
    _megatron("3.6B", 30, 3072, 32, 2, 1, 64, 512, 138),
    _megatron("7.5B", 36, 4096, 32, 4, 1, 128, 512, 142),
    _megatron("18B", 40, 6144, 48, 8, 1, 256, 1024, 135),
    _megatron("39B", 48, 8192, 64, 8, 2, 512, 1536, 138),
    _megatron("76B", 60, 10240, 80, 8, 4, 1024, 1792, 140),
    _megatron("145B", 80, 12288, 96, 8, 8, 1536, 2304, 148),
    _megatron("310B", 96, 16384, 128, 8, 16, 1920, 2160, 155),
    _megatron("530B", 105, 20480, 128, 8, 35, 2520, 2520, 163),
    _megatron("1T", 128, 25600, 160, 8, 64, 3072, 3072, 163),
    PublishedRun(name="Llama 3 8B, FSDP on 64 A100", source=TORCHTITAN, model=get_preset("llama3-8b"), gpu="a100",
                 gpus=64, seq_len=8192, global_batch=64, metric="mfu", published=0.582,
                 degrees={"tp": 1, "pp": 1, "cp": 1, "dp_shard": 64, "dp_replicate": 1}, activation_checkpointing="selective",
                 catalog_overrides=TORCHTITAN_FABRIC),
    PublishedRun(name="Llama 3 70B, FSDP on 64 A100", source=TORCHTITAN, model=get_preset("llama3-70b"), gpu="a100",
                 gpus=64, seq_len=8192, global_batch=64, metric="mfu", published=0.517,
                 degrees={"tp": 1, "pp": 1, "cp": 1, "dp_shard": 64, "dp_replicate": 1}, activation_checkpointing="full",
                 catalog_overrides=TORCHTITAN_FABRIC),
    PublishedRun(name="Llama 2 13B, FSDP on 64 A100", source=TORCHTITAN, model=LLAMA2_13B, gpu="a100",
                 gpus=64, seq_len=4096, global_batch=128, metric="mfu", published=0.611,
                 degrees={"tp": 1, "pp": 1, "cp": 1, "dp_shard": 64, "dp_replicate": 1}, activation_checkpointing="none",
                 catalog_overrides=TORCHTITAN_FABRIC),
    # Mixture of experts. NeMo runs Megatron's DDP with the distributed optimizer (ZeRO-1), planned
    # here as FSDP over the 64 ranks with the experts split 8 ways (the source's EP 8).
    PublishedRun(name="Mixtral 8x7B, EP8 on 64 B200 (FP8)", source=NEMO_B200, model=get_preset("mixtral-8x7b"), gpu="b200",
                 gpus=64, seq_len=4096, global_batch=256, metric="tokens_per_gpu_s", published=15457,
                 degrees={"tp": 1, "pp": 1, "cp": 1, "dp_shard": 64, "dp_replicate": 1, "ep": 8}, precision="fp8"),
    PublishedRun(name="Mixtral 8x7B, EP8 on 64 GB200 (FP8)", source=NEMO_GB200, model=get_preset("mixtral-8x7b"), gpu="gb200",
                 gpus=64, seq_len=4096, global_batch=256, metric="tokens_per_gpu_s", published=19275,
                 degrees={"tp": 1, "pp": 1, "cp": 1, "dp_shard": 64, "dp_replicate": 1, "ep": 8}, precision="fp8"),
    # 180K H800 GPU-hours per trillion tokens (table 1): 1e12 / (180e3 x 3600 s) tokens/s per GPU.
    # 2,048 H800, PP 16, EP 64, ZeRO-1 DP, no TP; DualPipe hides the all-to-all (sec. 3.2.1);
    # batch ramped to 15,360 sequences of 4,096 (sec. 4.2), planned at its final size.
    PublishedRun(name="DeepSeek-V3 on 2,048 H800 (FP8)", source=DEEPSEEK_V3, model=DEEPSEEK_V3_ARGS, gpu="h100",
                 gpus=2048, seq_len=4096, global_batch=15360, metric="tokens_per_gpu_s", published=1e12 / (180e3 * 3600),
                 degrees={"tp": 1, "pp": 16, "cp": 1, "dp_shard": 128, "dp_replicate": 1, "ep": 64}, even_stages=False,
                 precision="fp8", catalog_overrides=H800, efficiency_overrides={"ep_overlap": 1.0},
                 known_miss="the GPU-hours are the whole pretraining (batch ramp-up, failures and restarts "
                            "included) and the planner's stand-in for multi-head latent attention has a third of "
                            "MLA's attention FLOPs, which it also runs at the FP8 peak where DeepSeek kept BF16"),
]


@dataclass
class Prediction:
    run: PublishedRun
    predicted: float
    estimate: Estimate

    @property
    def error(self) -> float:
        return self.predicted / self.run.published - 1


def predict(run: PublishedRun, efficiency: Efficiency = Efficiency()) -> Prediction:
    workload = Workload(run.model, run.seq_len, run.global_batch, precision=run.precision, flash_attention=run.flash_attention,
                        sequence_parallel=run.sequence_parallel, op_level_selective=run.op_level_selective)
    efficiency = replace(efficiency, **run.efficiency_overrides)
    gpu = replace(get_accelerator(run.gpu), **run.catalog_overrides)
    constraints = Constraints(exact_gpus=True, even_stages=run.even_stages,
                              activation_checkpointing=run.activation_checkpointing, pp_schedule=run.pp_schedule,
                              **run.degrees)
    estimate = best_layout(workload, run.gpus, gpu, efficiency, constraints)
    if run.metric == "megatron_tflops":
        predicted = megatron_flops_per_step(run) / estimate.step_time_s / run.gpus / 1e12
    elif run.metric == "tokens_per_gpu_s":
        predicted = estimate.tokens_per_s / run.gpus
    else:
        predicted = estimate.mfu
    return Prediction(run, predicted, estimate)


def predict_all(efficiency: Efficiency = Efficiency()) -> list[Prediction]:
    return [predict(run, efficiency) for run in PUBLISHED_RUNS]


def comparison_rows(efficiency: Efficiency = Efficiency()) -> list[dict]:
    """The published-vs-predicted table, as `gigatrain plan --published` prints it."""
    return [{"run": p.run.name, "source": p.run.source, "metric": p.run.metric, "published": p.run.published,
             "predicted": p.predicted, "error": p.error, "layout": p.estimate.layout.describe(),
             "known_miss": p.run.known_miss} for p in predict_all(efficiency)]
