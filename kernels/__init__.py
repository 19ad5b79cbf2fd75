"""Pallas kernels (installed as ``gptjax.kernels``): fused flash attention and KV-cache decode attention.

    from gptjax.kernels import flash_attention, decode_attention
    out_BLHD = flash_attention.flash_attention(q_BLHD, k_BSKD, v_BSKD, causal=True, segment_ids_BL=None)
    out_BHD = decode_attention.decode_attention(q_BHD, k_cache_BSKD, v_cache_BSKD, lengths_B)

Each kernel module holds the kernel, its custom VJP where it has one, an ``<op>_reference`` in plain jnp
and an ``interpret`` switch; on a CPU backend the kernels always run in the Pallas interpreter.
"""
