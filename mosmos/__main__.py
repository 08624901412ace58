import sys

from mosmos.cli import main

sys.exit(main())
