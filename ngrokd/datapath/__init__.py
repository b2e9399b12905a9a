"""
The data path: what flows through it is one accepted connection.

A listener accepts it, the bridge dials ngrok's binding ingress over mutual
TLS, sends the framed C{ConnRequest} and reads the C{ConnResponse}, then
splices the two legs with flow control and half-close both ways.
"""
