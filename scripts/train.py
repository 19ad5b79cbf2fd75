"""Train one stage: python scripts/train.py --config configs/tiny.py:stage=pretrain --workdir runs/x"""

from absl import app, flags
from ml_collections import config_flags

from gptjax import train

config_flags.DEFINE_config_file("config", None, "Python config file (with :arg).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard, metrics.jsonl.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    train.setup_logging()
    train.run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
