"""Tests only: run megatron-core 0.16's models on CPU over gloo, and the 2-process workers of the engine tests.

megatron-core assumes CUDA in a few helpers that do not compute anything: RoPE moves its frequencies to
``torch.cuda.current_device()``; the hybrid stack's final norm is Transformer Engine's ``TENorm``; and without
Transformer Engine the router's gating GEMM reads a name (``te_general_gemm``) that 0.16.1 never defines. The
shim points the first at the CPU, the second at megatron-core's own torch norm, and sets the third to None (its
torch fallback). Nothing numerical changes.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
#: Nemotron-H's attention and MoE layers (no Mamba: megatron-core's Mamba mixer needs CUDA kernels)
NEMOTRON_MOE = dict(vocab_size=256, hidden_size=64, hybrid_override_pattern="*E*E", num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, mamba_num_heads=4, mamba_head_dim=32, ssm_state_size=16,
                    n_groups=2, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                    moe_intermediate_size=32, moe_shared_expert_intermediate_size=64, routed_scaling_factor=2.5,
                    norm_topk_prob=True, mlp_hidden_act="relu2", max_position_embeddings=256)
KINDS = {"llama": LLAMA, "nemotron_h": NEMOTRON_MOE}
#: training equivalence runs the aux-loss-free balancing alone: megatron's sequence-level aux loss (coefficient
#: 1e-6) is computed per THD pack, and a data-parallel rank's pack is not the one-process pack
NO_AUX = {"moe_aux_loss_coeff": 0.0}
SEGMENTS = [[(0, 5), (5, 12), (12, 15)], [(0, 9)]]   # two rows of 16: three awkward samples, one sample + padding


def install_cpu_shim() -> None:
    torch.cuda.current_device = lambda: "cpu"
    from megatron.core.ssm import mamba_block
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    mamba_block.TENorm = WrappedTorchNorm
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def tiny_hf(kind: str, seed: int = 0):
    """A random tiny transformers model; Nemotron-H's routing biases are made non-zero so they matter."""
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **KINDS[kind])).eval()
    with torch.no_grad():
        for name, buf in lm.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.5)
    return lm


@contextmanager
def megatron_state(**sizes):
    """megatron-core parallel state on an initialised gloo group (``tensor_model_parallel_size=...``)."""
    from megatron.core import parallel_state as ps

    if not torch.cuda.is_available():
        install_cpu_shim()
    ps.initialize_model_parallel(**sizes)
    try:
        yield ps
    finally:
        ps.destroy_model_parallel()


@contextmanager
def one_process(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous1", rank=0, world_size=1)
    try:
        with megatron_state() as ps:
            yield ps
    finally:
        dist.destroy_process_group()


def run_step(lm, ids: torch.Tensor) -> dict:
    """Logits, a loss and its gradient w.r.t. the input embeddings (the whole model's backward in one tensor)."""
    embeds = lm.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = lm(inputs_embeds=embeds, audex_segments=SEGMENTS).logits
    target = torch.roll(ids, -1, dims=1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
    loss.backward()
    return {"logits": logits.detach(), "loss": loss.detach(), "grad": embeds.grad.detach()}


def layout_worker(rank: int, world: int, tmp_path, kind: str, layout: dict) -> None:
    """One rank of a 2-process layout: build from the same HF weights, run a step, save its results and the
    gathered HF state dict (rank 0)."""
    from audex.modules.megatron_backbone import MegatronCausalLM
    from audex.parallel.config import ParallelismConfig

    hf = tiny_hf(kind)
    p = ParallelismConfig(world_size=world, **layout)
    with megatron_state(tensor_model_parallel_size=p.tensor, expert_model_parallel_size=p.expert,
                        expert_tensor_parallel_size=p.expert_tensor_size):
        lm = MegatronCausalLM(hf, p).eval()
        ids = torch.load(tmp_path / "ids.pt")
        out = run_step(lm, ids)
        out["local_params"] = sum(t.numel() for t in lm.mcore.parameters())
        state = lm.state_dict()
        if rank == 0:
            out["state"] = state
        torch.save(out, tmp_path / f"rank{rank}.pt")


def train_steps(lm, ids: torch.Tensor, rows: list[int], steps: int = 2) -> dict:
    """``steps`` steps of :class:`~audex.parallel.megatron_strategy.MegatronTrainer` (CPU path) on ``rows`` of the
    batch; the loss is the mean over the rows' positions, so that data-parallel halves average to the whole."""
    from audex.parallel.megatron_strategy import MegatronTrainer

    trainer = MegatronTrainer(lm, lr=1e-2, clip_grad=0.0, distributed_optimizer=False)
    segments = [SEGMENTS[r] for r in rows]
    part = ids[rows]

    def loss_fn():
        logits = lm(input_ids=part, audex_segments=segments).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.roll(part, -1, 1).reshape(-1))

    losses = [trainer.step(loss_fn)[0] for _ in range(steps)]
    return {"losses": torch.stack(losses), "state": lm.state_dict()}


def train_worker(rank: int, world: int, tmp_path, kind: str, layout: dict) -> None:
    """Data parallel over 2 ranks (each its own row) inside the given layout; rank 0 saves the trained weights."""
    from audex.modules.megatron_backbone import MegatronCausalLM
    from audex.parallel.config import ParallelismConfig

    p = ParallelismConfig(world_size=world, **layout)
    with megatron_state(tensor_model_parallel_size=p.tensor, expert_model_parallel_size=p.expert,
                        expert_tensor_parallel_size=p.expert_tensor_size) as ps:
        lm = MegatronCausalLM(tiny_hf(kind), p, overrides=NO_AUX)
        dp = ps.get_data_parallel_rank()
        rows = [0, 1] if ps.get_data_parallel_world_size() == 1 else [dp]
        out = train_steps(lm, torch.load(tmp_path / "ids.pt"), rows)
        if rank == 0:
            torch.save(out, tmp_path / "trained.pt")
