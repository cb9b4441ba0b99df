"""The model layer: configuration, the Llama-family transformer, RoPE, the KV cache it writes
into, and checkpoint loading / export. It knows nothing of decoding, serving or training."""
