"""The RL batch source: generate with the current policy -> score -> KL -> advantages -> minibatches (+ ptx).

    source = RolloutSource(config, batch_size=..., ctx=ctx, mesh=mesh)
    batch = source.next(train_state)   # one minibatch; a new rollout when the last one is used up

Each rollout takes ``rollout.batch_size / rollout.samples_per_prompt`` prompts, repeats each prompt in
``samples_per_prompt`` adjacent rows (a group), samples a response per row from the policy in
``train_state`` (in the rollout layout, ``rollout.mesh``, when one is set: the policy's params are resharded
device to device, never through the host), computes the experience (``gptjax.rl.experience``) and serves it
as ``rollout.epochs`` shuffled passes of ``train.batch_size`` minibatches: one train step each. PPO-ptx
adds ``ptx.ratio`` pretraining sequences per RL sequence to every minibatch.

Advantages: PPO's GAE over a critic (the trained role 'value'), or, for a critic-free objective
(``gptjax.losses.Objective.advantages``: GRPO, RLOO, GSPO, REINFORCE++), the objective's per-token
advantages over the whole rollout; groups are whole when it runs, and only the minibatches are shuffled.

State (checkpointed with the train state): the prompt and ptx iterators, the rollout count (the rollout RNG
is derived from it), the KL coefficient, the position inside the current rollout's minibatches and, when a
checkpoint falls inside a rollout, the rollout's experience itself, so a resume continues exactly.
"""

from __future__ import annotations

import base64
import functools
import io
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from ml_collections import FrozenConfigDict

from gptjax import data, model, rl
from gptjax.losses.ctx import full_params
from gptjax.model import sample, sharding
from gptjax.rl import policy as policy_lib
from gptjax.rl import reward_terms, sampling
from gptjax.rl.rollout_config import (  # noqa: F401 (rollout.check_config etc.: the settings)
    ROLES,
    advantages_kwargs,
    check_config,
    group_advantages,
    load_gold,
    objective,
    reward_at,
    reward_kl,
    roles_needed,
    score_rows,
)
from gptjax.rl.sampling import sampler_agreement  # also rollout.sampler_agreement


@functools.partial(jax.jit, static_argnames=("cfgs", "opts", "advantages_fn", "loss_opts"))
def _experience(
    params,
    tokens_BL,
    prompt_lengths_B,
    lengths_B,
    ended_B,
    kl_coef,
    temperature,
    extra_score_B=None,
    *,
    cfgs,
    opts,
    **group,
):
    """rl.experience, compiled once per (roles' configs, rollout options, group advantages) a process."""
    return rl.experience(
        params,
        dict(cfgs),
        tokens_BL,
        prompt_lengths_B,
        lengths_B,
        ended_B,
        kl_coef,
        temperature,
        opts,
        extra_score_B=extra_score_B,
        **group,
    )


@functools.partial(jax.jit, static_argnames=("cfg",))
def _compute_dtype_params(cfg, params):
    return sample.cast_to_compute_dtype(cfg, params)


def encode_arrays(arrays: dict[str, np.ndarray]) -> str:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_arrays(text: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(base64.b64decode(text))) as f:
        return {k: f[k] for k in f.files}


def host_local(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array (all of it on one host)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))

    return np.asarray(multihost_utils.global_array_to_host_local_array(x, x.sharding.mesh, x.sharding.spec))


class RolloutSource:
    """``prompts`` / ``ptx``: iterators to use instead of building them from ``config.data`` /
    ``config.ptx.data`` (the data protocol: ``next``, ``get_state``, ``set_state``; prompt batches hold
    ``prompt_BP``, ``prompt_lengths_B``, ``prompt_ids_B``)."""

    def __init__(self, config, *, batch_size: int, ctx, mesh, prompts=None, ptx=None):

        self.config, self.mesh, self.minibatch = config, mesh, batch_size
        r = config.rollout
        known = dict(ctx.role_cfgs + ctx.frozen_cfgs)
        self.cfgs = {name: known[name] for name in roles_needed(config) if name in known}
        check_config(config, self.cfgs, batch_size * jax.process_count())
        self.opts = FrozenConfigDict(
            {**r.to_dict(), "reward_at": reward_at(config), "score_rows": score_rows(config, self.cfgs, mesh)}
        )
        # A critic-free objective's advantages replace GAE (static for jit: a function and its options).
        self.group = advantages_kwargs(config)
        self.reward_kl = reward_kl(config)
        self.ctx = ctx  # the frozen roles' params, and a LoRA policy's base
        self.gen_cfg = policy_lib.generation_config(self.cfgs["policy"], r.lora_generation)
        self.terms = reward_terms.function_terms(
            config
        )  # the reward's function terms (rm: in the experience)
        self.vocab = data.get_vocabulary(config.data)
        per_host = r.batch_size // jax.process_count() // r.samples_per_prompt  # prompts; rows are responses
        seed = config.train.seed
        self.prompts = prompts or data.make_iterator(
            config.data, stage="prompts", batch_size=per_host, seq_len=r.prompt_len, seed=seed
        )
        self.ptx = None
        if config.ptx.ratio > 0:
            self.ptx = ptx or data.make_iterator(
                config.ptx.data,
                stage="pretrain",
                batch_size=int(config.ptx.ratio * batch_size),
                seq_len=config.ptx.seq_len,
                seed=seed,
            )
        self.gold = load_gold(r.gold) if r.gold else None
        self.rng = jax.random.key(seed + 1)
        # The rollout layout: another mesh over the same devices, e.g. tensor-parallel weights for decoding.
        self.rollout_mesh, self.rollout_shardings = mesh, None
        if r.mesh:
            self.rollout_mesh = sharding.make_mesh(r.mesh, devices=list(mesh.devices.flat))
            self.rollout_shardings = model.param_shardings(self.gen_cfg, self.rollout_mesh)
        self.iteration, self.pos, self.kl_coef = 0, 0, float(r.kl_coef)
        self.buffer: dict[str, np.ndarray] | None = None
        self.order: np.ndarray | None = None  # [minibatches, minibatch] row indices of the current rollout
        self.metrics: dict[str, float] = {}
        self._last_end: float | None = None

    # -- the source protocol ------------------------------------------------------------------------

    def scalars(self) -> dict[str, float]:
        return {"temperature": float(self.config.rollout.temperature)}

    def next(self, train_state) -> dict[str, np.ndarray]:
        if self.order is None or self.pos >= len(self.order):
            self._rollout(train_state)
        idx = self.order[self.pos]
        self.pos += 1
        batch = {k: v[idx] for k, v in self.buffer.items()}
        if self.ptx is not None:
            batch.update({f"ptx_{k}": v for k, v in next(self.ptx).items()})
        return batch

    def pop_metrics(self) -> dict[str, float]:
        """The last rollout's metrics, once (the loop logs them with the step that used the rollout)."""
        out, self.metrics = self.metrics, {}
        return out

    def position(self) -> dict:
        """Where the next minibatch comes from (cheap: no experience), for error messages."""
        return {
            "rollout": self.iteration,
            "minibatch": self.pos,
            "prompts": self.prompts.get_state(),
            "ptx": self.ptx.get_state() if self.ptx is not None else None,
        }

    def get_state(self) -> dict:
        state = {
            "iteration": self.iteration,
            "pos": self.pos,
            "kl_coef": self.kl_coef,
            "prompts": self.prompts.get_state(),
            "ptx": self.ptx.get_state() if self.ptx is not None else None,
            "experience": None,
        }
        if self.order is not None and self.pos < len(self.order):  # inside a rollout: keep its experience
            state["experience"] = encode_arrays({**self.buffer, "_order": self.order})
        return state

    def set_state(self, state: dict) -> None:
        self.iteration, self.pos, self.kl_coef = int(state["iteration"]), int(state["pos"]), state["kl_coef"]
        self.prompts.set_state(state["prompts"])
        if self.ptx is not None:
            if state.get("ptx") is None:
                raise ValueError("the checkpoint was written without ptx data; this run has ptx.ratio > 0")
            self.ptx.set_state(state["ptx"])
        self.buffer, self.order = None, None
        if state.get("experience"):
            arrays = decode_arrays(state["experience"])
            self.order = arrays.pop("_order")
            self.buffer = arrays

    # -- one rollout ---------------------------------------------------------------------------------

    def _policy_for_rollout(self, trained):
        """The policy's params as generation runs them (``rl.policy``: a LoRA policy's adapters on its base,
        or merged), in the rollout layout: cast to the compute dtype where they are (sharded as for
        training), then moved, so the rollout layout never holds a param-dtype (fp32) copy."""
        policy_params = policy_lib.generation_params(
            self.cfgs["policy"], full_params(trained, self.ctx)["policy"], self.config.rollout.lora_generation
        )
        if self.rollout_shardings is None:
            return policy_params, 0.0
        start = time.perf_counter()
        cast = _compute_dtype_params(self.gen_cfg, policy_params)
        moved = jax.block_until_ready(jax.device_put(cast, self.rollout_shardings))
        return moved, time.perf_counter() - start

    def _generate(self, policy_params, prompts: dict, call: int = 0) -> sample.Generation:
        """The rollout's samples, ``rollout.generate_rows`` prompts (per process: that / process count) per
        generate call; call i samples with key fold_in(rollout key, i) (one call: the rollout key). ``call``
        > 0: dynamic sampling's extra generation number ``call`` (its own key)."""
        r = self.config.rollout
        put = lambda x: jax.device_put(x, NamedSharding(self.rollout_mesh, sharding.batch_spec(x.ndim)))
        rng = jax.random.fold_in(self.rng, self.iteration)
        if call:
            rng = jax.random.fold_in(jax.random.fold_in(rng, 1 << 20), call)
        rng = jax.device_put(rng, sharding.replicated(self.rollout_mesh))
        rows = len(prompts["prompt_BP"])
        chunk = r.generate_rows // jax.process_count() if r.generate_rows else rows
        outs = []
        with jax.set_mesh(self.rollout_mesh):
            for i, start in enumerate(range(0, rows, chunk)):
                part = slice(start, start + chunk)
                out = sample.generate(
                    self.gen_cfg,
                    policy_params,
                    put(prompts["prompt_BP"][part]),
                    rng if chunk == rows else jax.random.fold_in(rng, i),
                    max_new_tokens=r.max_new_tokens,
                    prompt_lengths_B=put(prompts["prompt_lengths_B"][part]),
                    temperature=r.temperature,
                    eos_id=self.vocab.eos_id,
                    pad_id=self.vocab.pad_id,
                    return_info=True,
                )
                outs.append(jax.tree.map(host_local, out))
        if len(outs) == 1:
            return outs[0]
        joined = {k: np.concatenate([getattr(o, k) for o in outs]) for k in sample.Generation._fields[:-1]}
        return sample.Generation(**joined, steps=max(int(o.steps) for o in outs))

    def _responses(self, gen) -> list[str]:
        return [self.vocab.decode(toks[:n]) for toks, n in zip(gen.tokens_BT, gen.lengths_B, strict=True)]

    def _function_scores(self, prompts: dict, gen) -> sampling.Draw:
        """The rows with their function terms' and DAPO's overlong term's values {term: [B]}, their seconds
        and (when a function term reads them) the decoded responses."""
        r = self.config.rollout
        values, seconds, responses = {}, {}, None
        if self.terms:
            ids = prompts["prompt_ids_B"]
            responses = self._responses(gen)
            fields_of = getattr(self.prompts, "prompt_fields", None)
            fields = dict(fields_of(ids)) if fields_of is not None else {}
            values, seconds = reward_terms.score_functions(
                self.terms, self.prompts.prompt_text(ids), responses, fields, float(r.reward_fn_timeout_s)
            )
        if r.overlong_buffer:
            values["overlong"] = reward_terms.overlong_penalty(
                gen.lengths_B, gen.ended_B, r.max_new_tokens, r.overlong_buffer
            )
        return sampling.Draw(prompts, gen, values, seconds, responses)

    def _extra_score(self, values: dict[str, np.ndarray], n: int | None = None) -> np.ndarray:
        """The function terms' weighted sum [n] (n: the rows of ``values``)."""
        r = self.config.rollout
        n = len(next(iter(values.values()))) if n is None else n
        total = reward_terms.weighted_sum(self.terms, values, n)
        if "overlong" in values:
            total = total + np.float32(r.overlong_weight) * values["overlong"].astype(np.float32)
        return total

    def _draw(self, policy, call: int = 0) -> sampling.Draw:
        """The next prompts, each in samples_per_prompt adjacent rows (a group), their responses from
        generate call ``call`` (``_generate``) and function scores."""
        G = self.config.rollout.samples_per_prompt
        prompts = {k: np.repeat(v, G, axis=0) for k, v in next(self.prompts).items()}
        return self._function_scores(prompts, self._generate(policy, prompts, call=call))

    def _sample(self, policy) -> tuple[sampling.Draw, dict[str, float]]:
        """One rollout's rows and counts; with ``rollout.dynamic_sampling`` (DAPO) tied groups replaced
        (``gptjax.rl.sampling``)."""
        r = self.config.rollout
        first = self._draw(policy)
        if not r.dynamic_sampling:
            return first, {"tokens_generated": sampling.tokens_generated(first.gen)}
        more = functools.partial(self._draw, policy)
        return sampling.dynamic_sampling(
            first, more, self._extra_score, r.samples_per_prompt, r.max_extra_generations
        )

    def _rollout(self, train_state) -> None:
        r = self.config.rollout
        start = time.perf_counter()
        train_time = start - self._last_end if self._last_end is not None else 0.0
        policy, reshard_s = self._policy_for_rollout(train_state.params)
        drawn, sampling_counts = self._sample(policy)
        del policy
        prompts, gen, values, fn_seconds = drawn.prompts, drawn.gen, drawn.values, drawn.seconds
        generated = time.perf_counter()
        extra_score_B = self._extra_score(values, len(gen.lengths_B)) if values else None

        tokens_BL, _ = sample.concat_prompt_response(
            prompts["prompt_BP"], prompts["prompt_lengths_B"], gen.tokens_BT, gen.lengths_B, self.vocab.pad_id
        )
        lengths_B = prompts["prompt_lengths_B"] + gen.lengths_B
        batch = sharding.shard_batch(
            {
                "tokens_BL": np.asarray(tokens_BL, np.int32),
                "prompt_lengths_B": prompts["prompt_lengths_B"].astype(np.int32),
                "lengths_B": lengths_B.astype(np.int32),
                "ended_B": gen.ended_B,
                **({"extra_score_B": extra_score_B} if extra_score_B is not None else {}),
            },
            self.mesh,
        )
        params = policy_lib.experience_params(self.ctx, train_state.params, tuple(self.cfgs))
        exp = _experience(
            params,
            batch["tokens_BL"],
            batch["prompt_lengths_B"],
            batch["lengths_B"],
            batch["ended_B"],
            jnp.float32(self.kl_coef),
            jnp.float32(r.temperature),
            batch.get("extra_score_B"),
            cfgs=tuple(sorted(self.cfgs.items())),
            opts=self.opts,
            **self.group,
        )
        rows = {k: host_local(v) for k, v in exp.pop("stats").items()}
        scalars = {k: float(v) for k, v in jax.device_get(exp.pop("diagnostics")).items()}
        self.buffer = {k: host_local(v) for k, v in exp.items()}
        agreement, is_weight_BL = sampler_agreement(
            self.buffer["old_logp_BL"], gen.logprobs_BT, prompts["prompt_lengths_B"], gen.lengths_B, r.tis_cap
        )
        if is_weight_BL is not None:
            self.buffer["is_weight_BL"] = is_weight_BL
        scored = time.perf_counter()

        self.metrics = self._metrics(prompts, gen, rows, scalars, drawn.responses)
        self.metrics.update({f"reward/{name}": float(np.mean(v)) for name, v in values.items()})
        self.metrics.update({f"time/reward/{name}": s for name, s in fn_seconds.items()})
        self.metrics.update({**agreement, **sampling_counts})
        self.metrics.update(
            {
                "iteration": float(self.iteration + 1),
                "time/generate": generated - start - reshard_s - sum(fn_seconds.values()),
                "time/reshard": reshard_s,
                "time/score": scored - generated,
                "time/train": train_time,
            }
        )
        if r.kl_target > 0:  # adaptive KL (Ziegler et al.): steer the measured KL towards the target
            self.kl_coef = rl.adaptive_kl_coef(
                self.kl_coef, self.metrics["kl"], r.kl_target, r.kl_horizon, r.batch_size
            )
        rng = np.random.default_rng([self.config.train.seed, self.iteration])
        n = len(self.buffer["tokens_BL"])
        self.order = np.concatenate([rng.permutation(n) for _ in range(r.epochs)]).reshape(-1, self.minibatch)
        self.pos = 0
        self.iteration += 1
        self._last_end = time.perf_counter()

    def _metrics(self, prompts, gen, rows, scalars, responses=None) -> dict[str, float]:
        """The rollout's metrics; ``responses``: the rows' decoded responses where scoring decoded them."""
        out = {
            **({"reward/rm": float(np.mean(rows["rm_score_B"]))} if "rm_score_B" in rows else {}),
            "reward": float(np.mean(rows["score_B"])),
            "reward_std": float(np.std(rows["score_B"])),
            "shaped_reward": float(np.mean(rows["shaped_score_B"])),
            "kl": float(np.mean(rows["kl_B"])),
            "response_length": float(np.mean(gen.lengths_B)),
            "eos_rate": float(np.mean(gen.ended_B)),
            **scalars,
        }
        if self.reward_kl:  # the reward's KL penalty and its coefficient (GRPO's KL is a loss term)
            out.update(kl_penalty=float(np.mean(rows["kl_penalty_B"])), kl_coef=self.kl_coef)
        if self.gold is not None:
            texts = self.prompts.prompt_text(prompts["prompt_ids_B"])
            responses = self._responses(gen) if responses is None else responses
            golds = [
                self.gold(p, resp, finished=bool(e))
                for p, resp, e in zip(texts, responses, gen.ended_B, strict=True)
            ]
            out["gold_reward"] = float(np.mean(golds))
        logging.info(
            "rollout %d: reward %.3f kl %.3f length %.1f%s",
            self.iteration + 1,
            out["reward"],
            out["kl"],
            out["response_length"],
            f" gold {out['gold_reward']:.3f}" if "gold_reward" in out else "",
        )
        return out
