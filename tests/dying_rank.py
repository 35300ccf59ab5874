"""`lmforge` under torchrun, except that on the first attempt rank 1 dies when it is handed the rows of step 4
(right after the step-3 checkpoint): what a crashed machine looks like to the other ranks (test_distributed).
With DYING_RANK=hang it stops answering instead (a machine that hangs)."""

import os
import sys
import time

from lmforge.data.loader import TrainBatches

original = TrainBatches.next_rows


def next_rows(self, device="cpu"):
    if (self.batch_index == 3 * self.accum_steps and os.environ.get("RANK") == "1"
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        if os.environ.get("DYING_RANK") == "hang":
            print("rank 1 hangs after step 3", file=sys.stderr, flush=True)
            time.sleep(120)
        print("rank 1 dies after step 3", file=sys.stderr, flush=True)
        os._exit(1)
    return original(self, device)


TrainBatches.next_rows = next_rows

if __name__ == "__main__":
    from lmforge.cli import main

    sys.exit(main())
