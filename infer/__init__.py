"""Inference command line (`pdlm-infer`), result visualisation; thin over `pdlm_jax.api`."""
