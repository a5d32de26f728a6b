"""`ofa-train` / `ofa-eval` with the engine tests' fake task installed (run as a script, also under torchrun):

    python tests/finetune/engine_worker.py train --config ... --run-dir ...
    python tests/finetune/engine_worker.py eval run --config ... --checkpoint ... --data ... --out ...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.finetune.engine_fake_task import install  # noqa: E402

if __name__ == "__main__":
    install()
    tool, argv = sys.argv[1], sys.argv[2:]
    if tool == "train":
        from ofa_scale.train import main
    else:
        from ofa_scale.cli.evaluate import main
    sys.exit(main(argv))
