"""A tiny routed-expert Nemotron-H (8 experts, top-2, routing scale 2.5; layers MoE, attention, MoE) with router
weights spread out, for the MoE balancing tests."""

import torch
from transformers import AutoModelForCausalLM, NemotronHConfig


def tiny_nemotron_h():
    cfg = NemotronHConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, hybrid_override_pattern="E*E",
                          layers_block_type=None, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                          moe_shared_expert_intermediate_size=16, routed_scaling_factor=2.5, intermediate_size=32)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():                        # transformers zero-inits router weights; give them a spread
        for name, p in lm.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)
    return lm
