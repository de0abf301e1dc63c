"""Records, the masking rule, batching, packing, the tokenized cache, statistics and previews."""
