import sys

try:  # an interrupt while the CLI is still importing is an interrupt too, not a traceback
    from .cli import main
except KeyboardInterrupt:
    print("dycoke: interrupted", file=sys.stderr)
    sys.exit(130)

main()
