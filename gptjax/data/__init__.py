"""Data: seqio tasks and mixtures over JSONL / text / TFDS, cleaning, vocabularies, packing, built-in tasks.

Contract with the train loop::

    it = gptjax.data.make_iterator(config.data, stage="sft", batch_size=8, seq_len=128, seed=0)
    batch = next(it)                    # dict of numpy arrays, fixed shapes
    state = it.get_state()              # small JSON-serialisable dict: save it with the checkpoint
    it.set_state(state)                 # a resumed run then sees exactly the batches it would have seen
    it.stats()                          # {'source/reason': count}: records read, dropped, truncated, deduped

``batch_size`` is per host; ``shard_index`` / ``num_shards`` default to ``jax.process_index()`` /
``jax.process_count()`` and give each host a disjoint shard of every source. ``split="validation"`` iterates
the held-out data in a fixed order and loops. Batch keys by stage (each stage's batch format is a unit in
``gptjax.data.formats``: its records, tokenizing, batching and shapes; ``formats.get(name)``):

  pretrain, sft   ``inputs_BL``, ``targets_BL`` (targets[t] = the token after inputs[t] in the same document),
                  ``weights_BL`` (float32; 0 on padding, on each document's last token, and for sft on prompt
                  tokens), ``segment_ids_BL`` (1.. per packed document, 0 = padding), ``positions_BL``
                  (restart at 0 per document). Int32 except weights.
  rm              ``tokens_BKL`` (BOS prompt response EOS, right-padded), ``lengths_BK`` (real tokens; the
                  reward is read at lengths - 1, the EOS), ``prompt_lengths_BK`` (BOS + prompt), ``valid_BK``
                  (bool; False where a prompt has fewer than K responses, with lengths 0); best -> worst
                  along K.
  prompts         ``prompt_BP`` (BOS + prompt; right-padded, or left with ``data.pad_side='left'``),
                  ``prompt_lengths_B``, ``prompt_ids_B``; ``it.prompt_text(batch['prompt_ids_B'])`` gives the
                  raw prompt strings back (e.g. for ``gptjax.data.tiny.gold_reward``), and
                  ``it.prompt_fields(batch['prompt_ids_B'])`` the prompt records' other fields (any JSON
                  value, e.g. a task's ``answer``) as {field: [value per row]}: every field any record has,
                  None for a row whose record lacks it (reward functions get them as keyword arguments).

For ``stage='prompts'`` ``seq_len`` is the prompt length P; for 'rm' it is the prompt+response length L.
Records longer than that follow ``data.overflow`` ('truncate' | 'drop'; pretraining documents are split across
rows by default) and every such record is counted in ``stats()`` and the log.

Vocabulary: ``get_vocabulary(config.data)`` -> ``vocab_size``, ``encode``, ``decode``, ``pad_id``, ``bos_id``,
``eos_id``, ``render_chat(messages)``. The byte vocabulary (default) has 259 ids: bytes, PAD=256, BOS=257,
EOS=258. ``vocab.HuggingFaceVocabulary(path)`` wraps a checkpoint's ``tokenizer.json``.

The iterator also has ``num_examples`` (examples of the stage and split over all hosts), ``vocab`` and
``format`` (the stage's unit).
``gptjax.data.vocab.train_sentencepiece`` (and ``scripts/train_tokenizer.py``) trains a local SentencePiece
model for ``data.vocab.kind='sentencepiece'``.

Configs: ``default_config()`` documents every option, ``source(...)`` builds one source, and
``tiny_config(stage)`` is the built-in tiny task's section (``gptjax.data.tiny``: ``gold_reward``,
``eval_prompts``); ``arith_config(stage)`` the built-in arithmetic task's, problems with exact answers for RL
with verifiable rewards (``gptjax.data.arith``: ``verified_reward``, ``format_reward``, ``eval_problems``,
``evaluate_accuracy``; settings in ``data.arith``). TensorFlow and seqio are imported only when a pipeline
is built, and never see a GPU.
"""

from __future__ import annotations

from gptjax.data.config import arith_config, default_config, source, tiny_config
from gptjax.data.vocab import get_vocabulary

__all__ = ["arith_config", "default_config", "get_vocabulary", "make_iterator", "source", "tiny_config"]


def make_iterator(
    data_cfg,
    *,
    stage: str,
    batch_size: int,
    seq_len: int,
    seed: int,
    split: str = "train",
    shard_index: int | None = None,
    num_shards: int | None = None,
):
    """A resumable, host-sharded iterator of numpy batches for ``stage`` (see the module doc)."""
    # seqio and TensorFlow: imported when an iterator is made, not with the package
    from gptjax.data.pipeline import DataIterator

    if shard_index is None or num_shards is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        num_shards = jax.process_count() if num_shards is None else num_shards
    return DataIterator(
        data_cfg,
        stage=stage,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
        split=split,
        shard_index=shard_index,
        num_shards=num_shards,
    )
