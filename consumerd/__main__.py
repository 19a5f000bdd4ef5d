import sys

from consumerd.cli import main

sys.exit(main())
