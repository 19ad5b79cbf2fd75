"""Train one stage: python scripts/train.py --config configs/tiny.py:stage=pretrain --workdir runs/x

Quiet by default (gptjax's progress, libraries' warnings); a config or input error is one line naming the
fix. --verbose: library logs and the traceback (gptjax/train/console.py).

From a checkpoint (a Hugging Face directory or a workdir), the model's architecture can come from it:
    --config.train.init_from=/ckpt/llama --config.model.from_checkpoint=True
model keys also set on the command line must agree with it (every disagreement named in one error).
"""

from absl import app, flags
from ml_collections import config_flags

from gptjax import train
from gptjax.model import sharding
from gptjax.train import console, roles

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
    # Before anything is built: the command line's model keys against a from_checkpoint role's checkpoint.
    roles.check_model_overrides(f.config, config_flags.get_override_values(f["config"]))
    train.run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    console.main(main)
