"""Grounded SAM Gradio app (text -> Grounding DINO -> SAM).

The interactive app is built in the "Grounded SAM in the browser" milestone. Until then this entry
point says so instead of failing obscurely.
"""

import sys


def main() -> int:
    print("The Grounded SAM app is not built yet: this checkout has the foundation only. "
          "See README.md for the test command.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
