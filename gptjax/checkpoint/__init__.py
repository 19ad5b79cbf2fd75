"""Checkpoints: ``store.py`` saves, restores and resumes a run's state (orbax: params, EMA, optimizer, the
batch source's position, meta); ``integrity.py`` keeps non-finite arrays out and checksums in; ``disk.py``
turns an unwritable path or a full disk into one line; ``load.py`` loads models out of workdirs or Hugging
Face directories for ``init_from``, frozen roles, chat and the evaluators:
``gptjax.checkpoint.load_model(path, role=, ema=)``.
"""

from gptjax.checkpoint.load import (  # noqa: F401
    arch_differences,
    check_params_like,
    is_hf_dir,
    load_lm,
    load_model,
    load_params,
    load_vocabulary,
    lora_base_path,
    model_config_from_meta,
    roles_of,
)
from gptjax.checkpoint.store import (  # noqa: F401
    DamagedCheckpoint,
    Params,
    check_intact,
    check_params,
    load_meta,
    manager,
    meta_for,
    restore,
    restore_latest,
    save,
    shape_problems,
    step_path,
)
