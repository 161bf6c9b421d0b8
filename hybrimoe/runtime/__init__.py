"""The torch side: model loading, host expert store and accelerator slots, the per-layer executor."""
