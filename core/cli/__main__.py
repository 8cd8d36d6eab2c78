import sys

from berth.core.cli.app import main

sys.exit(main())
