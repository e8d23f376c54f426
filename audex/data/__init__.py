"""Audex data: manifests (schema), Figure 2 prompts, the sequence builder, CFG pre-processing, filters,
skip accounting; packing and the datamodule build batches from them."""
