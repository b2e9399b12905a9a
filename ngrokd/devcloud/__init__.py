"""A local stand-in for ngrok's API and binding ingress."""
