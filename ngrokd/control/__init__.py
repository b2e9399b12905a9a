"""
Control: what flows through it is people's and tools' questions and orders.

The AMP control socket that C{ngrokctl} talks to, the health and metrics
HTTP server, and the web page: each reads the daemon's status values and
changes the daemon only through its methods.
"""
