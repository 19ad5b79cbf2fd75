"""gptjax: GPT models through the whole InstructGPT recipe in JAX.

Shape-suffix key used in every tensor name (``hidden_BLD``, ``logits_BLV``):
  B batch, L length (query), S length (keys / KV cache), D model dim (the head dim inside attention
  functions: ``q_BLHD``), H heads, K kv heads, G query heads per kv head (H // K), F ff dim, V vocab,
  T response length, P prompt length, N number of layers, R LoRA rank, I / O a matrix's inputs / outputs.
"""

__version__ = "0.1.0"
