"""Audex data: manifests (schema), the sequence builder, CFG pre-processing, filters, skip accounting; packing,
collation, datasets and the loader (options, sampling, blend plan) build batches from them."""
