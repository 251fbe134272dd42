"""Run by torchrun in test_eval_distributed.py: ranks join the group (collectives wait at most
argv[2] seconds), rank 1 misbehaves as argv[1] says (``fail``: an error before the gather;
``slow``: no gather for an hour), and rank 0 gathers. Errors end as the CLI ends them: one
line on stderr, exit 1, and the process ends as the CLI ends it (distributed.leave)."""

import sys
import time

from dycoke_cli.distributed import leave, process_group
from dycoke_cli.errors import DycokeError

try:
    with process_group("cpu", float(sys.argv[2]), teardown=False) as shard:
        if shard.rank == 1 and sys.argv[1] == "fail":
            raise DycokeError("rank 1 failed before the gather")
        if shard.rank == 1 and sys.argv[1] == "slow":
            time.sleep(3600)
        gathered = shard.gather({"rank": shard.rank})
        if gathered is not None:
            print(gathered)
except DycokeError as exc:
    print(f"dycoke: error: {exc}", file=sys.stderr)
    leave(1)
leave(0)
