import sys

from core.cli.app import main

sys.exit(main())
