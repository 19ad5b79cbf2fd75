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
from gptjax.rl import reward_terms
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

    def _texts(self, prompts: dict, gen) -> tuple[list[str], list[str], dict[str, list]]:
        """The rows' prompt strings, decoded responses and prompt records' other fields (lists by field)."""
        texts = self.prompts.prompt_text(prompts["prompt_ids_B"])
        responses = [
            self.vocab.decode(toks[:n]) for toks, n in zip(gen.tokens_BT, gen.lengths_B, strict=True)
        ]
        fields_of = getattr(self.prompts, "prompt_fields", None)
        fields = fields_of(prompts["prompt_ids_B"]) if fields_of is not None else {}
        return texts, responses, dict(fields)

    def _function_scores(self, prompts: dict, gen) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """{term: [B] values} of the function terms and DAPO's overlong term; {term: seconds}."""
        r = self.config.rollout
        values, seconds = {}, {}
        if self.terms:
            texts, responses, fields = self._texts(prompts, gen)
            values, seconds = reward_terms.score_functions(
                self.terms, texts, responses, fields, float(r.reward_fn_timeout_s)
            )
        if r.overlong_buffer:
            values["overlong"] = reward_terms.overlong_penalty(
                gen.lengths_B, gen.ended_B, r.max_new_tokens, r.overlong_buffer
            )
        return values, seconds

    def _extra_score(self, values: dict[str, np.ndarray], n: int) -> np.ndarray:
        r = self.config.rollout
        total = reward_terms.weighted_sum(self.terms, values, n)
        if "overlong" in values:
            total = total + np.float32(r.overlong_weight) * values["overlong"].astype(np.float32)
        return total

    def _sample(self, policy) -> tuple[dict, sample.Generation, dict, dict, dict]:
        """One rollout's prompts (each in samples_per_prompt adjacent rows: a group), responses, function
        scores, their timings and the dynamic-sampling counts.

        With ``rollout.dynamic_sampling`` (DAPO), groups whose scores all tie teach a group objective nothing:
        they are dropped and replaced by groups of new prompts (up to ``max_extra_generations`` more generate
        calls, the same number on every process); what is still missing is filled with dropped groups."""
        r = self.config.rollout
        G = r.samples_per_prompt
        prompts = {k: np.repeat(v, G, axis=0) for k, v in next(self.prompts).items()}
        gen = self._generate(policy, prompts)
        values, seconds = self._function_scores(prompts, gen)
        # every token generated this rollout, extra generations too (every process: rows split evenly)
        counts = {"tokens_generated": float(np.sum(gen.lengths_B)) * jax.process_count()}
        if not r.dynamic_sampling:
            return prompts, gen, values, seconds, counts
        parts = [(prompts, gen, values)]
        rows = len(prompts["prompt_BP"])

        def tied(values) -> np.ndarray:  # [groups] bool
            total = self._extra_score(values, len(next(iter(values.values()))))
            g = total.reshape(-1, G)
            return np.all(g == g[:, :1], axis=1)

        informative = int(np.sum(~tied(values)))
        extra = 0
        while extra < r.max_extra_generations and _any_process(informative < rows // G):
            extra += 1
            more = {k: np.repeat(v, G, axis=0) for k, v in next(self.prompts).items()}
            more_gen = self._generate(policy, more, call=extra)
            more_values, more_seconds = self._function_scores(more, more_gen)
            seconds = {k: seconds.get(k, 0.0) + v for k, v in more_seconds.items()}
            parts.append((more, more_gen, more_values))
            informative += int(np.sum(~tied(more_values)))
            counts["tokens_generated"] += float(np.sum(more_gen.lengths_B)) * jax.process_count()
        # the informative groups in the order generated, then (if short) the first tied groups
        keep, fill = [], []
        for i, (_, _, vals) in enumerate(parts):
            for g, t in enumerate(tied(vals)):
                (fill if t else keep).append((i, g))
        chosen = (keep + fill)[: rows // G]
        counts |= {
            "dynamic_sampling/tied_groups": float(int(np.sum(tied(values)))),
            "dynamic_sampling/extra_generations": float(extra),
            "dynamic_sampling/tied_groups_kept": float(sum(1 for c in chosen if c in fill)),
        }

        def take(getter):
            return np.concatenate([getter(parts[i])[g * G : (g + 1) * G] for i, g in chosen])

        prompts = {k: take(lambda p, k=k: p[0][k]) for k in prompts}
        fields = sample.Generation._fields[:-1]
        gen = sample.Generation(
            **{k: take(lambda p, k=k: getattr(p[1], k)) for k in fields},
            steps=max(int(p[1].steps) for p in parts),
        )
        values = {k: take(lambda p, k=k: p[2][k]) for k in values}
        return prompts, gen, values, seconds, counts

    def _rollout(self, train_state) -> None:
        r = self.config.rollout
        start = time.perf_counter()
        train_time = start - self._last_end if self._last_end is not None else 0.0
        policy, reshard_s = self._policy_for_rollout(train_state.params)
        prompts, gen, values, fn_seconds, sampling_counts = self._sample(policy)
        del policy
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

        self.metrics = self._metrics(prompts, gen, rows, scalars)
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

    def _metrics(self, prompts, gen, rows, scalars) -> dict[str, float]:
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
            golds = [
                self.gold(p, self.vocab.decode(toks[:n]), finished=bool(e))
                for p, toks, n, e in zip(texts, gen.tokens_BT, gen.lengths_B, gen.ended_B, strict=True)
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


def _any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on any process (every process takes the same branch: generation is
    collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def sampler_agreement(
    trainer_logp_BL: np.ndarray,
    sampler_logp_BT: np.ndarray,
    prompt_lengths_B: np.ndarray,
    gen_lengths_B: np.ndarray,
    tis_cap: float = 0.0,
) -> tuple[dict[str, float], np.ndarray | None]:
    """How far the sampler's log-probs of the sampled tokens (from generation) are from the trainer's (the
    experience pass), over every sampled token: mean and max |log pi_sampler - log pi_trainer|; and, with
    ``tis_cap`` > 0, truncated importance-sampling weights min(pi_trainer / pi_sampler, tis_cap) per token
    [B, L] (1 off the sampled tokens). Response token t of row b sits at column prompt_length + t of the
    trainer's row (the layout of ``gptjax.rl.experience``)."""
    B, T = sampler_logp_BT.shape
    cols_BT = np.asarray(prompt_lengths_B)[:, None] + np.arange(T)[None, :]
    mask_BT = np.arange(T)[None, :] < np.asarray(gen_lengths_B)[:, None]
    cols_BT = np.minimum(cols_BT, trainer_logp_BL.shape[1] - 1)
    trainer_BT = np.take_along_axis(np.asarray(trainer_logp_BL, np.float64), cols_BT, axis=1)
    diff_BT = trainer_BT - np.asarray(sampler_logp_BT, np.float64)
    absdiff = np.abs(diff_BT[mask_BT])
    metrics = {
        "sampler_logp_diff_mean": float(absdiff.mean()) if absdiff.size else 0.0,
        "sampler_logp_diff_max": float(absdiff.max()) if absdiff.size else 0.0,
    }
    if not tis_cap:
        return metrics, None
    w_BT = np.where(mask_BT, np.minimum(np.exp(diff_BT), tis_cap), 1.0)
    w_BL = np.ones(trainer_logp_BL.shape, np.float32)
    rows_BT = np.broadcast_to(np.arange(B)[:, None], (B, T))
    w_BL[rows_BT[mask_BT], cols_BT[mask_BT]] = w_BT[mask_BT]
    metrics["tis_weight_mean"] = float(w_BT[mask_BT].mean()) if mask_BT.any() else 1.0
    metrics["tis_clipped_frac"] = float((np.exp(diff_BT[mask_BT]) > tis_cap).mean()) if mask_BT.any() else 0.0
    return metrics, w_BL
