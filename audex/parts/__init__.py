"""Stateless training helpers of the model (NeMo speechlm2 ``parts/`` style): losses, MoE balancing, optimizer."""
