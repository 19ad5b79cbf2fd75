"""Tiny GPT on the built-in synthetic task: every stage on a laptop CPU.

    python scripts/train.py --config configs/tiny.py:stage=pretrain --workdir runs/tiny/pretrain
    python scripts/train.py --config configs/tiny.py:stage=sft --workdir runs/tiny/sft \
        --config.train.init_from=runs/tiny/pretrain
    python scripts/train.py --config configs/tiny.py:stage=rm --workdir runs/tiny/rm \
        --config.train.init_from=runs/tiny/sft
    python scripts/train.py --config configs/tiny.py:stage=dpo --workdir runs/tiny/dpo \
        --config.train.init_from=runs/tiny/sft       # and stage=kto: unpaired best / worst of each ranking
    python scripts/train.py --config configs/tiny.py:stage=ppo,sft=runs/tiny/sft,rm=runs/tiny/rm \
        --workdir runs/tiny/ppo       # PPO-ptx: --config.ptx.ratio=1 --config.loss.ptx_coef=0.1
    python scripts/train.py --config configs/tiny.py:stage=grpo,sft=runs/tiny/sft,rm=runs/tiny/rm \
        --workdir runs/tiny/grpo      # and stage=rloo, gspo, dapo, dr_grpo: no critic, 4 answers per prompt;
                                      # stage=reinforce_pp: no critic, 1 response per prompt
    python scripts/train.py --config configs/tiny.py:stage=bon,sft=runs/tiny/sft,rm=runs/tiny/rm \
        --workdir runs/tiny/bon       # rejection sampling: SFT on the RM's best of 8 samples

Hardware: 2 CPU cores (about 1 s a step). Expected (``make demo``, pretrain -> SFT -> RM -> PPO): a
3.3M-parameter model; pretrain loss falls from 5.6 (uniform over the byte vocabulary) to ~1.25 in 300 steps;
250 SFT steps reach a greedy gold reward of ~0.68 on held-out prompts (~0.49 sampled at temperature 1; the
noisy demonstrations themselves score ~0.83, the ideal 1.0). The RM (K = 4 ranked responses per prompt from
simulated labelers, scalar head from the SFT model, its score the mean over the response, 90 steps) reaches
a held-out pairwise accuracy of ~0.72 (chance 0.5; the labelers are noisy) and orders ~0.82 of pairs like
the gold reward; its bias is then set so the SFT demonstrations score mean 0. PPO (30 rollouts of 64
prompts, 2 epochs of 2 minibatches each, beta 0.1, EMA 0.992) raises the sampled gold reward to ~0.54
(+0.05, > 3 standard errors paired by prompt) at a KL to SFT of ~0.7 nats per answer (EMA: ~0.16). DPO (ref
= the frozen SFT model) raises the held-out chosen-minus-rejected margin. GRPO and RLOO (PPO's steps and
learning rate, rollouts of 16 prompts x 4 answers, no critic, about 2.5 minutes; one seed): RLOO (beta 0.1 in
the reward) +0.03 gold (EMA +0.04, ~4 standard errors) at a KL of ~0.6 (EMA ~0.14); GRPO (k3 KL in the loss,
coefficient 0.5) holds the gold reward (-0.01 +- 0.01; EMA +0.02) at a KL of ~0.6. The same steps and
rollout size, one seed, held-out gold sampled at temperature 1 paired by prompt with SFT's (0.49): GSPO (the
paper's clip range 3e-4 / 4e-4 on the sequence ratio, no KL) +0.02 +- 0.01 (EMA +0.03 +- 0.01) at a KL of
~1.0 (EMA ~0.2); REINFORCE++ (64 prompts x 1 answer, beta 0.1 per token in the reward) +0.01 +- 0.01 (EMA
+0.04 +- 0.01) at ~0.7 (EMA ~0.14). KTO (DPO's steps and learning rate) reaches a held-out pairwise accuracy
of its implicit reward of ~0.61 (DPO ~0.64) with the gold reward unchanged (-0.00 +- 0.01; DPO +0.03).
"""

from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict

from gptjax import data
from gptjax.model import ModelConfig
from gptjax.train import defaults, stages

RL_STAGES = ("ppo", "grpo", "rloo", "gspo", "reinforce_pp", "dapo", "dr_grpo")
STAGES = ("pretrain", "sft", "rm", "dpo", "kto", *RL_STAGES, "bon")
GROUP_STAGES = ("grpo", "rloo", "gspo", "dapo", "dr_grpo")  # 4 responses per prompt


def tiny_model(head: str = "lm") -> ModelConfig:
    return ModelConfig.gpt2(vocab_size=288, d_model=256, n_layers=4, n_heads=4, max_len=128, head=head)


def get_config(arg: str | None = None):
    args = defaults.parse_arg(arg, {"stage": "pretrain", "sft": "runs/tiny/sft", "rm": "runs/tiny/rm"})
    stage = args["stage"]
    if stage not in STAGES:
        raise ValueError(f"configs/tiny.py: stage={stage!r}; choose one of {STAGES}")
    if stage == "bon":
        return bon_config(args["sft"], args["rm"])
    if stage in RL_STAGES:
        return ppo_config(args["sft"], args["rm"], stage)
    c = defaults.base_config(stage)
    c.model = defaults.model_section(tiny_model("scalar" if stage == "rm" else "lm"))
    c.data = data.tiny_config(stages.get(stage).data)
    c.train.batch_size = 16
    c.train.seq_len = 128
    c.train.eval_steps = 2
    if stage == "pretrain":
        c.train.steps = 300
        c.optim.lr = 2e-3
        c.optim.warmup_steps = 20
    elif stage in ("rm", "dpo", "kto"):
        # Tiny prompts and answers fit in 64 tokens; batch counted in prompts (K = 4 responses each).
        c.train.seq_len = 64
        c.train.steps = 90 if stage == "rm" else 60
        c.optim.lr = {"rm": 1e-4, "dpo": 2e-5, "kto": 2e-5}[stage]
        c.optim.warmup_steps = 10
        c.train.eval_every = c.train.steps
        c.train.eval_steps = 8
        if stage == "rm":
            c.normalize = ConfigDict({"data": data.tiny_config("sft"), "examples": 512})
            # The gold reward adds up per-character credit: a tiny RM ranks the policy's own samples better
            # when its score is the mean of per-token outputs than when one token must carry it all.
            c.loss.reward_at = "mean"
        else:
            c.frozen = ConfigDict({"ref": defaults.frozen_role()})  # '' = the SFT model in train.init_from
    else:
        c.train.steps = 250
        c.optim.lr = 5e-4
        c.optim.warmup_steps = 10
    c.train.checkpoint_every = c.train.steps
    c.lock()
    return c


def ppo_config(sft: str, rm: str, stage: str = "ppo"):
    """PPO with an EMA policy and an RM-initialised critic: policy and ref from ``sft``, value and reward
    from ``rm``. A step is one minibatch of 32 responses; a rollout is 64 prompts (2 steps, 2 epochs).
    PPO-ptx is off (it doubles a step); ``ptx.ratio`` 1 with ``loss.ptx_coef`` 0.1 is this task's setting (the
    ptx_coef sweep in docs/results.md: it keeps the reward and pays back the loss on held-out text that PPO
    costs; InstructGPT's 27.8 makes the policy write pretraining documents).

    ``stage`` 'grpo' / 'rloo' / 'gspo' / 'dapo' / 'dr_grpo': the same policy, optimizer, rollout size and
    steps without the critic; a rollout is 16 prompts x 4 responses (``rollout.samples_per_prompt``), each
    response's advantage its standing in its group ('dapo', 'dr_grpo': their papers' losses, no KL term;
    Dr. GRPO's constant length normaliser is the generation budget). 'reinforce_pp': no critic and no group,
    64 prompts x 1 response."""
    c = defaults.base_config(stage)
    c.data = data.tiny_config("prompts")
    policy_optim = c.optim.copy_and_resolve_references()
    policy_optim.update(lr=3e-5, warmup_steps=5, schedule="constant", ema_decay=0.992)
    value_optim = c.optim.copy_and_resolve_references()
    value_optim.update(lr=1e-4, warmup_steps=5, schedule="constant")
    roles = {"policy": defaults.trained_role(tiny_model("lm"), policy_optim, init_from=sft)}
    if stages.get(stage).objective.critic:
        roles["value"] = defaults.trained_role(tiny_model("scalar"), value_optim, init_from=rm)
    c.roles = ConfigDict(roles)
    c.frozen = ConfigDict({"ref": defaults.frozen_role(sft), "reward": defaults.frozen_role(rm)})
    c.rollout = defaults.rollout_section()
    # kl_coef 0.1, not InstructGPT's 0.02: on 5-token answers 0.02 lets the policy drift ~1.5 nats into
    # what this small RM misjudges (gold reward falls while the RM reward rises)
    c.rollout.update(
        batch_size=64,
        prompt_len=16,
        max_new_tokens=16,
        epochs=2,
        kl_coef=0.1,
        gold="gptjax.data.tiny:gold_reward",
    )
    if stage in GROUP_STAGES:
        c.rollout.samples_per_prompt = 4
    if stage == "dr_grpo":
        c.loss.length_norm = float(c.rollout.max_new_tokens)  # the paper's constant: the generation budget
    if stage == "grpo":
        # 0.5, not the paper's 0.04: group-standardised advantages are ~1 whatever the RM's spread, and at
        # 0.04 the policy drifts ~6 nats into what this small RM misjudges (held-out gold 0.51 -> 0.28)
        c.loss.kl_coef = 0.5
    c.ptx = defaults.ptx_section(data.tiny_config("pretrain"), ratio=0.0, seq_len=64)
    c.train.batch_size = 32
    c.train.seq_len = c.rollout.prompt_len + c.rollout.max_new_tokens
    c.train.steps = 120
    c.train.log_every = 4
    c.train.checkpoint_every = c.train.steps
    del c.optim  # each role has its own
    c.lock()
    return c


def bon_config(sft: str, rm: str):
    """Rejection sampling: SFT from ``sft`` on the reward model's (``rm``) best of 8 samples for each of 1024
    training prompts, written to the workdir as demonstrations (``gptjax.rl.bon.prepare_demonstrations``)."""
    c = defaults.base_config("bon")
    c.model = defaults.model_section(tiny_model("lm"))
    c.data = data.tiny_config("sft")  # its vocabulary; the sources become the written demonstrations
    c.bon = ConfigDict(
        {
            "policy": "",  # '' = train.init_from
            "reward": rm,
            "data": data.tiny_config("prompts"),
            "prompts": 1024,
            "n": 8,
            "temperature": 1.0,
            "max_new_tokens": 16,
            "require_eos": True,  # only finished samples compete (an unfinished one is a truncated answer)
            "gold": "gptjax.data.tiny:gold_reward",  # logged, never used to choose
        }
    )
    c.train.update(init_from=sft, batch_size=16, seq_len=128, steps=150)
    c.train.checkpoint_every = c.train.steps
    c.optim.update(lr=1e-4, warmup_steps=10)
    c.lock()
    return c


def get_sweeps():
    """The ablations, from the demo's SFT and RM checkpoints, 3 seeds each (differences here are a few
    hundredths of gold reward): ``python scripts/sweep.py --config configs/tiny.py --sweep NAME``.
    InstructGPT's (Appendix E): the PPO-ptx coefficient, the KL beta, EMA (every PPO run is evaluated with
    and without it), the critic's initialisation; and the methods on one table."""
    from gptjax.research import sweep

    ptx = [
        sweep.Point(
            f"ptx_coef={coef}",
            overrides=(("loss.ptx_coef", coef), ("ptx.ratio", 1.0 if coef else 0.0)),
            seed=s,
            x=coef,
        )
        for s in range(3)  # seed-major: an interrupted sweep has every coefficient
        for coef in (0.0, 0.1, 1.0, 27.8)
    ]
    critic = [
        sweep.Point(f"critic from {who.strip('{}')}", overrides=(("roles.value.init_from", who),), seed=s)
        for who in ("{rm}", "{sft}")
        for s in range(3)
    ]
    methods = [  # seed-major: an interrupted sweep already has every method
        p
        for s in range(3)
        for p in [
            *(
                sweep.Point(name, arg=f"stage={name},sft={{sft}},rm={{rm}}", seed=s)
                for name in ("ppo", "grpo", "rloo", "bon")
            ),
            sweep.Point("best-of-16 sampling", best_of_n=16, seed=s),
        ]
    ]
    # LoRA (rank 16 on every projection, 10x the policy's learning rate) against full fine-tuning, on the
    # base as loaded and quantised; the critic trains in full throughout
    lora = {
        "roles.policy.model.lora_rank": 16,
        "roles.policy.model.lora_alpha": 32.0,
        "roles.policy.model.lora_targets": ("wq", "wk", "wv", "wo", "w_in", "w_out"),
        "roles.policy.optim.lr": 3e-4,
    }
    lora_points = [
        p
        for s in range(2)
        for p in [
            sweep.Point("full fine-tuning", seed=s),
            sweep.Point("LoRA r16", overrides=tuple(lora.items()), seed=s),
            *(
                sweep.Point(
                    f"LoRA r16, {q} base",
                    overrides=(*lora.items(), ("roles.policy.model.lora_base_quant", q)),
                    seed=s,
                )
                for q in ("int8", "nf4")
            ),
        ]
    ]
    return {
        "lora": sweep.Sweep(tuple(lora_points), title="PPO: LoRA and a quantised base vs full fine-tuning"),
        "kl_coef": dataclasses.replace(
            sweep.grid("rollout.kl_coef", [0.0, 0.01, 0.02, 0.1, 1.0], seeds=3), xlog_above=0.01
        ),
        "ptx_coef": sweep.Sweep(
            tuple(ptx), xlabel="loss.ptx_coef (ptx.ratio 1 when > 0)", text_loss=True, xlog_above=0.1
        ),
        "seeds": sweep.Sweep(
            tuple(sweep.Point("ppo", seed=s) for s in range(5)), title="PPO with and without EMA"
        ),
        "critic_init": sweep.Sweep(tuple(critic), title="critic initialised from the RM or the SFT model"),
        "methods": sweep.Sweep(tuple(methods), title="PPO, GRPO, RLOO, rejection sampling, best-of-N"),
        # 2 points of 4 steps each: that a sweep runs end to end (tests/test_sweep.py)
        "smoke": dataclasses.replace(  # the tests' 2-point sweep (its plot on the kl_coef sweep's axis)
            sweep.grid(
                "rollout.kl_coef", [0.0, 0.1], train__steps=4, rollout__batch_size=32, train__batch_size=16
            ),
            xlog_above=0.01,
        ),
    }
