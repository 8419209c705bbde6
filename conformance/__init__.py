"""conformance: the same model, weights and data through both backends, per policy."""
