"""Reproduce and diagnose disagreements between the SGLang Model Gateway's HTTP and gRPC modes."""
