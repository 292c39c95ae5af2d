import sys

from gitlab_producer.cli import main

sys.exit(main())
