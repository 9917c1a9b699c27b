import sys

from mulcon.cli import main

sys.exit(main())
