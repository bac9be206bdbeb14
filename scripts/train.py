#!/usr/bin/env python
"""Train a GPT-NeoX model.

    python scripts/train.py                                   # configs/tiny.py on the bundled Pile sample
    python scripts/train.py --config configs/pythia.py:160m --config.optimizer.lr=3e-4 \
        --config.mesh.tensor=2 --workdir runs/x

Any config field can be overridden with --config.path.to.field=value. A --workdir holding a checkpoint resumes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from neox_jax import cli  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
if __name__ == "__main__":
    cli.check_config_overrides(sys.argv, DEFAULT_CONFIG, own_flags=("workdir",))
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file (path[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots); default runs/<config>.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from neox_jax import distributed, trainer

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and grain log every save and read at INFO
    distributed.initialize()
    config = _CONFIG.value
    workdir = _WORKDIR.value or cli.default_workdir(flags.FLAGS["config"].config_filename)
    logging.info("workdir %s", workdir)
    last = trainer.train(config, workdir)
    print(cli.summary(last, workdir), flush=True)


if __name__ == "__main__":
    app.run(main)
