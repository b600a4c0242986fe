import sys

from ditlens.cli import main

sys.exit(main())
