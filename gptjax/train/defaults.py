"""Config sections every stage shares (configs/*.py start from these), and the config-arg parser."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from ml_collections import ConfigDict, config_dict

from gptjax import data, losses
from gptjax.data import formats
from gptjax.model import ModelConfig
from gptjax.train import stages

# The types of ModelConfig fields whose default is None, so ``--config.model.<field>=...`` can set them.
_NONE_TYPES = {"n_kv_heads": int, "head_dim": int, "d_ff": int, "scan_layers": bool}


def model_section(cfg: ModelConfig) -> ConfigDict:
    """The model section: every ModelConfig field; a None field is a typed placeholder the CLI can set."""
    values = dataclasses.asdict(cfg)
    return ConfigDict(
        {
            k: config_dict.placeholder(_NONE_TYPES[k]) if v is None and k in _NONE_TYPES else v
            for k, v in values.items()
        }
    )


def base_config(stage: str) -> ConfigDict:
    c = ConfigDict()
    c.stage = stage
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.loss = loss_section(stage)
    c.train = ConfigDict(
        {
            "steps": 100,
            "batch_size": 32,  # global, in sequences
            "micro_batches": 1,  # gradient accumulation: batch_size / micro_batches per forward pass
            "seq_len": 128,
            "seed": 0,
            "log_every": 10,
            "eval_every": 0,  # 0 = no eval during training
            "eval_steps": 4,
            "checkpoint_every": 100,
            "keep_checkpoints": 3,
            "init_from": "",  # workdir of an earlier stage (or a Hugging Face directory) starting this one
            "init_role": "",  # which trained role of init_from's workdir (runs with several roles)
            "init_ema": False,  # start from init_from's EMA weights
            # a step with a non-finite loss or gradients: 'skip' its update (logged, counted in the rows'
            # 'skipped'), stopping after max_nonfinite_in_a_row in a row; 'stop' at once, naming the batch
            "nonfinite": "skip",
            "max_nonfinite_in_a_row": 10,
            # a finite but exploding step: loss or update norm above this factor x its median over the last
            # divergence_window steps, or an update larger than the params, stops the run before its next
            # checkpoint (guard.Divergence); 0 = off
            "divergence_factor": 100.0,
            "divergence_window": 20,
            # a resume refuses a checkpoint trained with another config, data or upstream checkpoint, except
            # in these keys (a comma list, e.g. 'optim.lr,data.sources.main.path', or 'all')
            "resume_changes": "",
            # Weights & Biases project: every logged row also goes there ('' = off; WANDB_MODE=offline needs
            # no network; pip install -e '.[wandb]')
            "wandb_project": "",
        }
    )
    # Evaluators the loop runs on their own cadence: {name: gptjax.evals.entry(fn, every=..., **options)}
    c.evals = ConfigDict()
    c.optim = ConfigDict(
        {
            "lr": 3e-4,
            "warmup_steps": 10,
            "schedule": "cosine",  # cosine | linear | constant
            "min_lr_ratio": 0.1,
            "b1": 0.9,  # InstructGPT Adam betas
            "b2": 0.95,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "clip_norm": 1.0,
            "ema_decay": 0.0,  # > 0 keeps an EMA of the params (InstructGPT PPO: 0.992)
        }
    )
    return c


def loss_section(stage: str) -> ConfigDict:
    """config.loss: the stage's objective and its options' defaults (``--config.loss.<key>=...`` sets one)."""
    name = stages.get(stage).loss
    return ConfigDict({"name": name, **losses.objective(name).options})


def frozen_role(init_from: str = "", role: str = "", ema: bool = False) -> ConfigDict:
    """A frozen role: a workdir (one ``role`` of it, its ``ema``) or HF directory; '' = the trained model's
    own ``train.init_from``."""
    c = ConfigDict({"init_from": init_from, "role": role, "ema": ema})
    c.lock()
    return c


def rollout_section() -> ConfigDict:
    """Rollouts and experience of PPO, GRPO and RLOO (InstructGPT defaults where the paper gives them,
    docs/references.md); gamma, lam and whiten_advantages shape PPO's GAE only."""
    return ConfigDict(
        {
            "batch_size": 512,  # responses (rows) per rollout, global; a multiple of train.batch_size
            # N responses to each prompt, in adjacent rows (a group); batch_size / N prompts per rollout.
            # Group losses (GRPO, RLOO) need N >= 2
            "samples_per_prompt": 1,
            "epochs": 1,  # passes over each rollout's minibatches
            "prompt_len": 256,  # P: prompts are right-padded to it (longer ones follow data.overflow)
            "max_new_tokens": 256,
            "temperature": 1.0,
            "top_k": 0,  # PPO refuses truncated sampling (its samples would be off-policy)
            "top_p": 1.0,
            "kl_kind": "k1",  # per-token KL estimator in the reward: k1 | k2 | k3
            "kl_coef": 0.02,  # beta; the adaptive controller's starting value when kl_target > 0
            "kl_target": 0.0,  # > 0: adaptive KL controller steering the per-response KL to this many nats
            "kl_horizon": 10000,
            "gamma": 1.0,
            "lam": 0.95,
            "whiten_advantages": True,
            "reward_at": "",  # 'last' | 'mean' (see loss.reward_at); '': as the reward model was trained
            "reward_norm": False,  # normalise the RM scores over each rollout batch
            "reward_clip": 0.0,  # > 0: clip the score to +-reward_clip
            "missing_eos_penalty": 0.0,  # subtracted from the score of a response that never emitted EOS
            "score_rows": 0,  # rows per scoring forward pass (dividing batch_size); 0: fp32 logits < 2 GiB
            "generate_rows": 0,  # rows (responses) per generate call, dividing batch_size (KV cache); 0: all
            "mesh": ConfigDict({}),  # the rollout layout, e.g. {data: 1, fsdp: 1, tensor: -1}; {}: training's
            "gold": "",  # 'module:function' gold reward logged per rollout (the tiny task's: built in)
            # The reward: a weighted sum of terms (gptjax.rl.reward_terms). The frozen reward model's weight
            # (0: none loaded); 'module:function' terms fn(prompts, responses, **fields) -> [float] and their
            # weight; named terms {name: {fn, weight, <option>: value}}; a deadline per function call.
            "rm_weight": 1.0,
            "reward_fn": "",
            "reward_fn_weight": 1.0,
            "reward_terms": ConfigDict({}),
            "reward_fn_timeout_s": 300.0,
            # DAPO: overlong shaping (a soft penalty over the last overlong_buffer tokens; 0: off) and dynamic
            # sampling (groups whose rewards all tie are dropped and replaced by new prompts' groups, at most
            # max_extra_generations extra generate calls a rollout; then the tied groups fill the gap).
            "overlong_buffer": 0,
            "overlong_weight": 1.0,
            "dynamic_sampling": False,
            "max_extra_generations": 4,
            # > 0: truncated importance sampling: each sampled token's loss weighted by
            # min(pi_trainer / pi_sampler, tis_cap), for a sampler whose log-probs differ from the trainer's
            "tis_cap": 0.0,
            # A LoRA policy generates with its adapters on the frozen base ('adapters': no copy of the
            # weights) or merged into a generation copy ('merged': plain matmuls); gptjax.rl.policy
            "lora_generation": "adapters",
        }
    )


def ptx_section(data_cfg=None, ratio: float = 0.0, seq_len: int = 128) -> ConfigDict:
    """PPO-ptx: ``ratio`` pretraining sequences (of ``seq_len`` tokens) per RL sequence in each minibatch;
    the LM loss on them is weighted by ``loss.ptx_coef``."""

    return ConfigDict(
        {
            "data": data_cfg if data_cfg is not None else data.default_config(),
            "ratio": ratio,
            "seq_len": seq_len,
        }
    )


def trained_role(
    model_cfg: ModelConfig, optim: ConfigDict, init_from: str = "", init_role: str = ""
) -> ConfigDict:
    """One ``config.roles.<name>`` entry of a multi-role stage (PPO's policy / value)."""
    return ConfigDict(
        {
            "model": model_section(model_cfg),
            "init_from": init_from,
            "init_role": init_role,
            "init_ema": False,
            "optim": optim,
        }
    )


def parse_arg(arg: str | None, defaults: dict) -> dict:
    """'stage=sft,size=small' -> dict, checked against the defaults' keys."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"config arg {item!r}: expected key=value")
        k, v = item.split("=", 1)
        if k not in defaults:
            raise ValueError(f"config arg {k!r} is unknown; known: {sorted(defaults)}")
        out[k] = v
    return out


def load_config(spec: str):
    """'configs/tiny.py:stage=sft' -> that file's get_config('stage=sft') (what --config does on the CLI)."""

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def own_data(stage: str, path: str, tokenizer: str = ""):
    """The data section for a user's files: one source (text/JSONL glob), optionally an HF tokenizer.json.

    ``stage``: a stage of the stage table (its objective's batch format) or a batch format itself; the file
    holds records of that format's own kind (text, demonstrations, rankings, prompts)."""
    batch_format = stages.get(stage).data if stage in stages.STAGES else stage
    section = data.default_config()
    section.sources.main = data.source(format=formats.get(batch_format).record, path=path)
    if tokenizer:
        section.vocab.kind, section.vocab.path = "hf", tokenizer
    return section
