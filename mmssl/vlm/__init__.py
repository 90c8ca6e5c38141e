"""LLaVA-style vision-language models: a frozen vision encoder, a projector and a causal language decoder."""
