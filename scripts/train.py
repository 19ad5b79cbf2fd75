"""Train one stage: python scripts/train.py --config configs/tiny.py:stage=pretrain --workdir runs/x"""

from absl import app, flags
from ml_collections import config_flags

from gptjax import train
from gptjax.model import sharding

config_flags.DEFINE_config_file("config", None, "Python config file (with :arg).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard, metrics.jsonl.")
flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0 (else from the environment)."
)
flags.DEFINE_integer("num_processes", None, "Multi-host: how many processes take part.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0 .. num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    train.setup_logging()
    f = flags.FLAGS
    sharding.maybe_initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
    train.run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
