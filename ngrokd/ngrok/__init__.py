"""
ngrok's side: what flows through it is the API's answers.

The API client, trust in ngrok's certificates, this machine's identity
(key, certificate, operator id) and the discovery poll of bound endpoints.
"""
