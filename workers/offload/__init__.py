"""Attention offloading (after Lamina): decode attention and the KV cache on attention
workers, the dense layers on the model worker (docs/attention-offload.md)."""
