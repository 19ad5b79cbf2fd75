"""Chat in the terminal with a model: any stage's workdir with an LM head, or a Hugging Face directory.

    python scripts/chat.py --checkpoint runs/demo/sft
    python scripts/chat.py --checkpoint runs/ppo --role policy --ema --temperature 0.7 --top_p 0.9
    python scripts/chat.py --checkpoint runs/demo/sft --prompt "2+2?" --prompt "and 3+3?" --temperature 0

Each turn renders the whole conversation with the vocabulary's chat template (a workdir's training config
names its vocabulary, data.vocab; an HF directory has its tokenizer) and streams the reply as it is decoded;
EOS ends the reply. A reply takes at most --max_new_tokens tokens; by default up to 128, fewer where the
conversation leaves less of the model's context (max_len), and a conversation keeps at least
min(128, max_len / 2) tokens free for the reply. A conversation that no longer leaves that room drops its
oldest turns, saying so on stderr. Type 'exit' or Ctrl-D to quit; Ctrl-C stops a reply. With --prompt it runs
those turns of one conversation, prints each reply (one a line) and exits. --verbose: library logs and
tracebacks.
A PPO run's greedy or low-temperature answers: take its EMA weights (--role policy --ema); the policy's own
sharpen its sampled answers but can lose at the mode (docs/results.md, "PPO's greedy answers").
"""

from __future__ import annotations

import itertools
import sys

import jax
from absl import flags, logging

from gptjax import checkpoint, model
from gptjax.model import stream
from gptjax.train import console

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or Hugging Face checkpoint dir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step in a workdir (default: latest).")
_ROLE = flags.DEFINE_string("role", None, "Role of a multi-role workdir, e.g. PPO's 'policy'.")
_EMA = flags.DEFINE_bool("ema", False, "Load the workdir's EMA weights.")
_PROMPT = flags.DEFINE_multi_string(
    "prompt", [], "Non-interactive: the user's turns; print the replies, exit."
)
_SYSTEM = flags.DEFINE_string("system", None, "A system message to start the conversation with.")
_BOS = flags.DEFINE_bool("bos", True, "Prepend BOS, as the training converters do.")
_MAX_NEW = flags.DEFINE_integer(
    "max_new_tokens", None, "Most tokens per reply (default: up to 128, as the model's context allows)."
)
_TEMP = flags.DEFINE_float("temperature", 1.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (turn i uses fold_in(seed, i)).")
flags.mark_flag_as_required("checkpoint")
DEFAULT_MAX_NEW = 128


def reply_room(max_len: int, asked: int | None) -> int:
    """Tokens of the model's context a conversation leaves free for the reply: --max_new_tokens, or by
    default min(128, max_len / 2) (the reply may then take more, up to 128, where the context has it)."""
    if asked is None:
        return min(DEFAULT_MAX_NEW, max_len // 2)
    if not 0 < asked < max_len:
        raise ValueError(
            f"--max_new_tokens={asked} must be in [1, {max_len - 1}]: the model's context is {max_len} "
            "tokens, the prompt included"
        )
    return asked


def notice(msg: str) -> None:
    print(f"[chat] {msg}", file=sys.stderr, flush=True)


def fit(messages: list[dict], vocab, max_len: int, room: int) -> list[int]:
    """Token ids of the conversation plus the generation prompt; drops the oldest turns (from ``messages``,
    a system message stays) until it fits ``max_len`` with ``room`` tokens left for the reply, raises if the
    newest cannot."""
    first = int(bool(messages) and messages[0]["role"] == "system")
    while True:
        text = vocab.render_chat(messages, add_generation_prompt=True)
        ids = ([vocab.bos_id] if _BOS.value else []) + vocab.encode(text)
        if len(ids) + room <= max_len:
            return ids
        if len(messages) - first <= 1:
            lower = "lower --max_new_tokens" if _MAX_NEW.value else "set a smaller --max_new_tokens"
            raise ValueError(
                f"the newest message alone renders to {len(ids)} tokens and leaves {max_len - len(ids)} of "
                f"the model's context of {max_len} for the reply, which needs {room}: shorten it or {lower}"
            )
        dropped = 2 if messages[first + 1]["role"] == "assistant" and len(messages) - first > 2 else 1
        del messages[first : first + dropped]
        notice(
            f"the conversation ({len(ids)} tokens + {room} for the reply) passes the model's context of "
            f"{max_len}: dropped the oldest turn"
        )


def reply(cfg, params, vocab, ids: list[int], rng) -> str:
    """Stream one reply to stdout as it is decoded; returns its text."""
    tokens, shown, ended = [], "", False
    max_new = _MAX_NEW.value or min(DEFAULT_MAX_NEW, cfg.max_len - len(ids))
    gen = stream.stream(
        cfg, params, ids, rng, max_new_tokens=max_new, temperature=_TEMP.value,
        top_k=_TOP_K.value, top_p=_TOP_P.value, eos_id=vocab.eos_id,
    )  # fmt: skip
    try:
        for token in gen:
            if token == vocab.eos_id:
                ended = True
                break
            tokens.append(token)
            text = vocab.decode(tokens)
            # A token may end inside a multi-byte character: wait for the rest before printing.
            if not text.endswith("\ufffd") and text.startswith(shown):
                print(text[len(shown) :], end="", flush=True)
                shown = text
    except KeyboardInterrupt:
        gen.close()
        notice("reply stopped")
    text = vocab.decode(tokens)
    # A tokenizer may re-decode earlier text differently once more tokens follow: then show the whole reply.
    print(text[len(shown) :] if text.startswith(shown) else f"\n{text}", flush=True)
    if not ended and len(tokens) == max_new:
        notice(f"the reply stopped at {max_new} tokens (--max_new_tokens) without EOS")
    return text


def main(argv):
    del argv
    console.setup_logging(logging.WARNING)  # INFO logs would bury the conversation
    try:
        cfg, params, vocab = checkpoint.load_lm(
            _CHECKPOINT.value, _STEP.value, role=_ROLE.value, ema=_EMA.value
        )
        room = reply_room(cfg.max_len, _MAX_NEW.value)
    except (ValueError, OSError) as e:
        sys.exit(f"chat.py: error: {e}")
    if not cfg.scan:  # slice the stacked layers once, not every turn
        params = model.unstack_layers(cfg, params)
    messages = [{"role": "system", "content": _SYSTEM.value}] if _SYSTEM.value else []
    interactive = not _PROMPT.value
    turns = iter(_PROMPT.value)
    rng = jax.random.key(_SEED.value)
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        notice(f"{_CHECKPOINT.value}: {model.num_params(cfg):,} params; 'exit' or Ctrl-D quits")
    for turn in itertools.count():
        if interactive:
            try:
                user = input("user: ")
            except (EOFError, KeyboardInterrupt):
                print()
                return
            if user.strip() in ("exit", "quit"):
                return
        else:
            user = next(turns, None)
            if user is None:
                return
        messages.append({"role": "user", "content": user})
        try:
            ids = fit(messages, vocab, cfg.max_len, room)
        except ValueError as e:
            if not interactive:
                sys.exit(f"chat.py: error: {e}")
            notice(str(e))
            messages.pop()
            continue
        if interactive:
            print("assistant: ", end="", flush=True)
        text = reply(cfg, params, vocab, ids, jax.random.fold_in(rng, turn))
        messages.append({"role": "assistant", "content": text})


if __name__ == "__main__":
    console.main(main)
