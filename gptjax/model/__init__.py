"""The model room: config, layers, attention, the decoder, decoding and sharding.

    cfg = gptjax.model.ModelConfig(...)                 # config.py (presets: .gpt2(), .llama(), .opt())
    params = gptjax.model.init(cfg, rng, mesh=None)     # transformer.py
    logits_BLV = gptjax.model.apply(cfg, params, tokens_BL)

``layers.py`` and ``attention.py`` are the decoder's building blocks, ``sample.py`` generates with a KV cache,
``sharding.py`` maps logical axis names to the mesh and ``flops.py`` counts model FLOPs.
"""

from gptjax.model.config import (  # noqa: F401
    ModelConfig,
    unknown_fields,
    config_from_dict,
    head_params,
    REMAT_POLICIES,
    UNSHAPED_FIELDS,
    ARCH_FIELDS,
    LORA_TARGETS,
)
from gptjax.model.transformer import (  # noqa: F401
    num_params,
    flops_per_token,
    GPT,
    over_layers,
    param_shapes,
    logical_axes,
    param_shardings,
    init,
    positions_from_segments,
    apply,
    lm_head_weight,
    init_cache,
    decode,
    unstack_layers,
    Params,
)
