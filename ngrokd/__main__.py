# -*- test-case-name: ngrokd.test.test_cli -*-
"""
C{python -m ngrokd}: the C{ngrokd} command (L{ngrokd.cli.main}), as the
service written by C{ngrokd install} runs it.
"""

from ngrokd.cli.main import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
