"""Token compression: temporal token merging (ttm), KV-cache pruning (pruning), baselines."""
