"""Chat in the terminal with a model: any stage's workdir with an LM head, or a Hugging Face directory.

    python scripts/chat.py --checkpoint runs/demo/sft
    python scripts/chat.py --checkpoint runs/ppo --role policy --ema --temperature 0.7 --top_p 0.9
    python scripts/chat.py --checkpoint runs/demo/sft --prompt "2+2?" --prompt "and 3+3?" --temperature 0

Each turn renders the whole conversation with the vocabulary's chat template (a workdir's training config
names its vocabulary, data.vocab; an HF directory has its tokenizer) and streams the reply as it is decoded;
EOS ends the reply. A conversation that no longer fits the model's context (prompt + --max_new_tokens >
max_len) drops its oldest turns, saying so on stderr. Type 'exit' or Ctrl-D to quit; Ctrl-C stops a reply.
With --prompt it runs those turns of one conversation, prints each reply (one a line) and exits.
"""

from __future__ import annotations

import itertools
import sys

import jax
from absl import app, flags, logging

from gptjax import checkpoint, model
from gptjax.model import stream

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or Hugging Face checkpoint dir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step in a workdir (default: latest).")
_ROLE = flags.DEFINE_string("role", None, "Role of a multi-role workdir, e.g. PPO's 'policy'.")
_EMA = flags.DEFINE_bool("ema", False, "Load the workdir's EMA weights.")
_PROMPT = flags.DEFINE_multi_string(
    "prompt", [], "Non-interactive: the user's turns; print the replies, exit."
)
_SYSTEM = flags.DEFINE_string("system", None, "A system message to start the conversation with.")
_BOS = flags.DEFINE_bool("bos", True, "Prepend BOS, as the training converters do.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Most tokens per reply.")
_TEMP = flags.DEFINE_float("temperature", 1.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (turn i uses fold_in(seed, i)).")
flags.mark_flag_as_required("checkpoint")


def notice(msg: str) -> None:
    print(f"[chat] {msg}", file=sys.stderr, flush=True)


def fit(messages: list[dict], vocab, max_len: int, max_new: int) -> list[int]:
    """Token ids of the conversation plus the generation prompt; drops the oldest turns (from ``messages``,
    a system message stays) until it fits ``max_len`` with room for the reply, raises if the newest cannot."""
    first = int(bool(messages) and messages[0]["role"] == "system")
    while True:
        text = vocab.render_chat(messages, add_generation_prompt=True)
        ids = ([vocab.bos_id] if _BOS.value else []) + vocab.encode(text)
        if len(ids) + max_new <= max_len:
            return ids
        if len(messages) - first <= 1:
            raise ValueError(
                f"the newest message alone renders to {len(ids)} tokens; with max_new_tokens={max_new} it "
                f"does not fit the model's context of {max_len}: shorten it or lower --max_new_tokens"
            )
        dropped = 2 if messages[first + 1]["role"] == "assistant" and len(messages) - first > 2 else 1
        del messages[first : first + dropped]
        notice(
            f"the conversation ({len(ids)} tokens + {max_new} for the reply) passes the model's context of "
            f"{max_len}: dropped the oldest turn"
        )


def reply(cfg, params, vocab, ids: list[int], rng) -> str:
    """Stream one reply to stdout as it is decoded; returns its text."""
    tokens, shown, ended = [], "", False
    gen = stream.stream(
        cfg, params, ids, rng, max_new_tokens=_MAX_NEW.value, temperature=_TEMP.value,
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
    if not ended and len(tokens) == _MAX_NEW.value:
        notice(f"the reply stopped at --max_new_tokens={_MAX_NEW.value} without EOS")
    return text


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # library INFO logs would bury the conversation
        logging.set_verbosity(logging.WARNING)
    try:
        cfg, params, vocab = checkpoint.load_lm(
            _CHECKPOINT.value, _STEP.value, role=_ROLE.value, ema=_EMA.value
        )
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
            ids = fit(messages, vocab, cfg.max_len, _MAX_NEW.value)
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
    app.run(main)
