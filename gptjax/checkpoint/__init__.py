"""Checkpoints: ``store.py`` saves, restores and resumes a run's state (orbax: params, EMA, optimizer, the batch
source's position, meta); ``load.py`` loads models out of workdirs or Hugging Face directories for
``init_from``, frozen roles, chat and the evaluators: ``gptjax.checkpoint.load_model(path, role=, ema=)``.
"""

from gptjax.checkpoint.store import (  # noqa: F401
    manager,
    save,
    DamagedCheckpoint,
    step_path,
    check_intact,
    restore,
    restore_latest,
    check_params,
    shape_problems,
    load_meta,
    meta_for,
    Params,
)
from gptjax.checkpoint.load import (  # noqa: F401
    roles_of,
    model_config_from_meta,
    is_hf_dir,
    load_params,
    arch_differences,
    lora_base_path,
    load_model,
    check_params_like,
    load_vocabulary,
    load_lm,
)
