"""
C{python -m ngrokd}: the C{ngrokd} command (L{ngrokd.cli.main}), as the
service written by C{ngrokd install} runs it.
"""

from ngrokd.cli.main import main

main()
