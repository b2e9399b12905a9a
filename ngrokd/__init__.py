"""
ngrokd: reach ngrok's Kubernetes-bound endpoints from any machine, by name.
"""

__version__ = "0.3.0.dev0"
