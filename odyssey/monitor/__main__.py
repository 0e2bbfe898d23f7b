"""`python -m odyssey.monitor RUN`: what `odyssey monitor` and `odyssey train --monitor` run."""

import sys

from odyssey.errors import OdysseyError
from odyssey.monitor import main

if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except OdysseyError as e:
        print(f"odyssey monitor: error: {e}", file=sys.stderr)
        sys.exit(e.exit_status)
    except KeyboardInterrupt:
        sys.exit(130)
