"""``python -m dycoke_cli``: the same entry point as the ``dycoke`` command."""

import sys

try:  # an interrupt before the handler is installed is an interrupt too, not a traceback
    from dycoke_cli.cli.entry import main
except KeyboardInterrupt:
    sys.stderr.write("dycoke: interrupted\n")
    sys.exit(130)

main()
