"""The model room: config, layers, attention, the decoder, decoding and sharding.

    cfg = gptjax.model.ModelConfig(...)                 # config.py (presets: .gpt2(), .llama(), .opt(),
                                                        #   .qwen3(), .gemma2(), .gemma3())
    params = gptjax.model.init(cfg, rng, mesh=None)     # transformer.py
    logits_BLV = gptjax.model.apply(cfg, params, tokens_BL)

``layers.py`` and ``attention.py`` are the decoder's building blocks, ``sample.py`` generates with a KV cache,
``sharding.py`` maps logical axis names to the mesh, ``flops.py`` counts model FLOPs and ``quant.py``
quantises weights (int8, int4, NF4; a frozen QLoRA base the model runs on as it is).
"""

from gptjax.model.config import (  # noqa: F401
    ARCH_FIELDS,
    CHECKPOINT_FIELDS,
    FAMILIES,
    LORA_TARGETS,
    REMAT_POLICIES,
    UNSHAPED_FIELDS,
    ModelConfig,
    arch_differences,
    config_from_dict,
    head_params,
    unknown_fields,
)
from gptjax.model.transformer import (  # noqa: F401
    GPT,
    Params,
    apply,
    cap_logits,
    decode,
    flops_per_token,
    init,
    init_cache,
    lm_head_weight,
    logical_axes,
    num_params,
    over_layers,
    param_shapes,
    param_shardings,
    positions_from_segments,
    unstack_layers,
)
