"""Text -> tokens -> batches: corpus sources, tokenizing, splitting and shard writing (the cached prepare
step), and the LightningDataModule."""
